"""Software checks that notebook 03 relies on, moved out of the notebook (it keeps the checks that teach)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import config, data, models
from helpers.tools import checkpoints, recipes, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_recipe(tiny_shtech, out, **overrides):
    """The notebook's recipe call, shrunk to the tiny dataset (2 epochs of 4 crops of 64 px)."""
    settings = {"data_root": str(tiny_shtech), "resize": 1.0, "crop": 64, "batch_size": 2, "epochs": 2,
                "max_fit": 4, "max_val": 2, "workers": 0, "cache_in_memory": False, "bn_recalibrate": 2,
                "checkpoint_every": 0, "amp": False, "channels_last": False}
    settings.update(overrides)
    return recipes.recommended_config("heatmap_cnn", "B", out, quick=True, resume=True, **settings)


def test_untrained_reference_is_the_trainers_initialisation(tiny_shtech, isolated_home, monkeypatch):
    """Notebook 03 compares the trained network with `torch.manual_seed(cfg.seed); build_model(...)`:
    that must be exactly the network the trainer starts from."""
    built = []
    real_build = models.build_model

    def recording_build(name, **kwargs):
        model = real_build(name, **kwargs)
        built.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(models, "build_model", recording_build)
    cfg = _tiny_recipe(tiny_shtech, isolated_home / "runs" / "init", epochs=1, seed=3)
    trainer.train(cfg)
    monkeypatch.setattr(models, "build_model", real_build)
    assert len(built) == 1
    torch.manual_seed(cfg.seed)
    reference = models.build_model("heatmap_cnn", **cfg.model_kwargs).state_dict()
    assert reference.keys() == built[0].keys()
    for key, value in reference.items():
        assert torch.equal(value, built[0][key]), key
    torch.manual_seed(cfg.seed + 1)  # a different seed gives a different network: the check can fail
    other = models.build_model("heatmap_cnn", **cfg.model_kwargs).state_dict()
    assert not torch.equal(other["body.conv1.weight"], built[0]["body.conv1.weight"])


def test_recipe_checkpoint_is_where_notebook_05_reads_it(tiny_shtech, isolated_home):
    """The run folder of notebook 03 holds best.pt: a HeatmapCNN with the recipe's settings and scale,
    from the best epoch of the history."""
    run_dir = recipes.run_folder("heatmap_cnn", "B", data.resolve_data_source(tiny_shtech), quick=True)
    assert run_dir == config.runs_root() / "heatmap_cnn_B_quick"
    cfg = _tiny_recipe(tiny_shtech, run_dir)
    result = trainer.train(cfg)
    assert result.best == run_dir / "best.pt" and result.best.is_file()
    model, info = checkpoints.load_model(run_dir / "best.pt", device="cpu", expect_model="heatmap_cnn")
    assert isinstance(model, models.HeatmapCNN) and not model.training
    assert model.width == cfg.model_kwargs["width"] and model.init_output == cfg.model_kwargs["init_output"]
    assert info.scale == cfg.scale and info.model_name == "heatmap_cnn"
    validated = [row for row in result.history if math.isfinite(row["val_mae"])]  # quick: every 8th epoch and the last
    best_row = min(validated, key=lambda row: row["val_mae"])
    assert info.epoch == result.best_epoch == best_row["epoch"]
    assert abs(info.best_val_mae - result.best_val_mae) < 1e-9
    assert abs(result.best_val_mae - best_row["val_mae"]) < 1e-9
    # resume=True on a finished run does no more work and reports the same best epoch
    again = trainer.train(cfg)
    assert again.best_epoch == result.best_epoch and len(again.history) == len(result.history)
