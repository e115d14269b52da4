"""Your own data, end to end from the command line, and fine-tuning from a checkpoint (--init).

A tiny made-up folder: synthetic crowd images with LabelMe, CVAT and VIA exports written from known
points -> ``crowd import-points`` -> ``crowd density build`` -> a base run -> a fine-tuning run with
``--init`` -> ``crowd evaluate`` on the held-out images, each a subprocess of ``python -m helpers``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import data, predict
from helpers.errors import CheckpointError, CrowdError
from helpers.tools import checkpoints, cli, trainer
from helpers.tools.synth import render_scene

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["--model-arg", "width=8", "--crop", "64", "--batch-size", "2", "--workers", "0"]


def _exports(folder, n_images=8, seed=3):
    """Images and their points written as LabelMe (3), CVAT (3, one XML) and VIA (2, test) exports."""
    rng = np.random.default_rng(seed)
    truth = {}
    for tool in ("labelme", "cvat", "via"):
        (folder / tool).mkdir(parents=True)
    tools = ["labelme"] * 3 + ["cvat"] * 3 + ["via"] * (n_images - 6)
    cvat_images, via_rows = [], []
    for i, tool in enumerate(tools, start=1):
        scene = render_scene(rng, 96, 128, int(rng.integers(5, 25)), "B", with_background=False)
        name = f"crowd_{i}"
        Image.fromarray(scene.image).save(folder / tool / f"{name}.jpg", quality=95)
        pts = np.round(scene.points, 2)
        truth[name] = pts
        if tool == "labelme":
            shapes = [{"label": "head", "points": [[x, y]], "group_id": None, "description": "",
                       "shape_type": "point", "flags": {}, "mask": None} for x, y in pts.tolist()]
            doc = {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": f"{name}.jpg",
                   "imageData": None, "imageHeight": 96, "imageWidth": 128}
            (folder / tool / f"{name}.json").write_text(json.dumps(doc, indent=2))
        elif tool == "cvat":
            shapes = "".join(f'    <points label="head" source="manual" occluded="0" points="{x:.2f},{y:.2f}" '
                             'z_order="0">\n    </points>\n' for x, y in pts.tolist())
            cvat_images.append(f'  <image id="{len(cvat_images)}" name="{name}.jpg" width="128" height="96">\n'
                               f"{shapes}  </image>\n")
        else:
            for k, (x, y) in enumerate(pts.tolist()):
                shape = json.dumps({"name": "point", "cx": x, "cy": y}, separators=(",", ":"))
                via_rows.append(f'{name}.jpg,1000,"{{}}",{len(pts)},{k},"{shape.replace(chr(34), 2 * chr(34))}","{{}}"')
    (folder / "cvat" / "annotations.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<annotations>\n  <version>1.1</version>\n'
        + "".join(cvat_images) + "</annotations>\n")
    (folder / "via" / "via_export.csv").write_text(
        "filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,"
        "region_attributes\n" + "\n".join(via_rows) + "\n")
    return truth


def _crowd(*args, env):
    proc = subprocess.run([sys.executable, "-m", "helpers", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _last_json(proc):
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_own_data_from_annotation_to_evaluation(tmp_path):
    truth = _exports(tmp_path / "exports")
    env = {**os.environ, "CROWD_HOME": str(tmp_path / "home"), "CROWD_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "CROWD_QUICK": "1"}
    env.pop("CROWD_DATA", None)
    ds = tmp_path / "my_crowds"
    ex = tmp_path / "exports"
    summaries = [_last_json(_crowd("import-points", *src, "--out", ds, env=env)) for src in (
        (ex / "labelme", "--format", "labelme"),
        (ex / "cvat" / "annotations.xml", "--format", "cvat"),
        (ex / "via" / "via_export.csv", "--format", "via", "--split", "test", "--points", "csv"))]
    assert [s["images"] for s in summaries] == [3, 3, 2]
    assert summaries[1]["split_images"] == 6 and (summaries[1]["fit"], summaries[1]["val"]) == (5, 1)
    # the dataset reads back as the points we started from
    for split in ("train", "test"):
        for r in data.list_records("B", split, ds):
            np.testing.assert_allclose(data.read_points(r.points_path), truth[r.name], atol=0)
    built = _last_json(_crowd("density", "build", "--root", ds, "--part", "B", "--no-progress", env=env))
    assert built["images"] == 8 and built["heads"] == sum(len(p) for p in truth.values())

    runs = tmp_path / "runs"
    _crowd("train", "--data-root", ds, "--part", "B", "--epochs", "1", *TINY, "--out", runs / "base", env=env)
    ft = _last_json(_crowd("train", "--data-root", ds, "--part", "B", "--epochs", "2", *TINY,
                           "--init", runs / "base" / "best.pt", "--out", runs / "ft", "--json", env=env))
    config = json.loads((runs / "ft" / "config.json").read_text())
    assert config["init"] == str((runs / "base" / "best.pt").resolve())
    assert ft["epochs"] == 2

    result = _last_json(_crowd("evaluate", "--checkpoint", runs / "ft" / "best.pt", "--part", "B",
                               "--split", "test", "--data-root", ds, env=env))
    # independent: the same checkpoint counted image by image with the core's predict.count
    model, info = checkpoints.load_model(runs / "ft" / "best.pt", device="cpu")
    errors = [predict.count(r.image_path, model, scale=info.scale, device="cpu").count - len(truth[r.name])
              for r in data.list_records("B", "test", ds)]
    assert result["images"] == 2
    assert result["mae"] == pytest.approx(np.mean(np.abs(errors)), abs=1e-3)


def test_too_few_training_images_is_explained(tmp_path):
    truth = _exports(tmp_path / "exports", n_images=7)
    first = sorted(truth)[0]
    src = tmp_path / "exports" / "labelme"
    for name in sorted(truth)[1:3]:
        (src / f"{name}.json").unlink()
    ds = tmp_path / "ds"
    from helpers.tools import folders

    summary = folders.import_points(src, "labelme", ds)
    assert summary.names == [first] and "training needs at least 2" in summary.notes[-1]
    with pytest.raises(CrowdError, match="training needs at least one of each"):
        trainer.train(trainer.TrainConfig(data_root=str(ds), epochs=1, out=str(tmp_path / "run"), workers=0))


# --------------------------------------------------------------------------- --init


@pytest.fixture(scope="module")
def base_run(tiny_shtech, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = trainer.TrainConfig(data_root=str(tiny_shtech), epochs=1, crop=64, batch_size=4, workers=0,
                              model_kwargs={"width": 8}, out=str(out), max_fit=4, max_val=1)
    torch.set_num_threads(1)
    return trainer.train(cfg)


def test_init_starts_from_exactly_those_weights(base_run, tiny_shtech, tmp_path):
    saved = checkpoints.load_checkpoint(base_run.best)["model"]
    cfg = trainer.TrainConfig(data_root=str(tiny_shtech), epochs=1, crop=64, batch_size=4, workers=0,
                              model_kwargs={"width": 8}, init=str(base_run.best), seed=5,
                              out=str(tmp_path / "ft"), max_fit=4, max_val=1, scheduler="none").resolved()
    from helpers.models import build_model

    model = build_model("heatmap_cnn", width=8)
    trainer.load_init_weights(model, cfg, announce=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())

    # in a run: after the first Adam step every weight is within lr of the init weights (an Adam
    # step moves each weight by at most about lr), while a fresh init (seed 5) is far from them
    after_first = {}

    def grab(net, step):
        if step == 1:
            after_first.update({k: v.detach().clone() for k, v in net.named_parameters()})

    trainer.train(cfg, on_step=grab)
    fresh = dict(build_model("heatmap_cnn", width=8).named_parameters())
    moved = max(float((after_first[k] - saved[k]).abs().max()) for k in after_first)
    assert 0 < moved <= cfg.lr * 1.01
    assert max(float((fresh[k].detach() - saved[k]).abs().max()) for k in after_first) > 100 * cfg.lr


def test_init_checks_the_network_and_the_scale(base_run, tiny_shtech, tmp_path):
    common = {"data_root": str(tiny_shtech), "epochs": 1, "crop": 64, "workers": 0, "init": str(base_run.best)}
    with pytest.raises(CheckpointError, match=r"holds a heatmap_cnn with \{'width': 8\}.*--model-arg width=8"):
        trainer.train(trainer.TrainConfig(**common, out=str(tmp_path / "a")))
    with pytest.raises(CheckpointError, match="trained with --scale 100.*Fine-tune with --scale 100"):
        trainer.train(trainer.TrainConfig(**common, model_kwargs={"width": 8}, scale=1.0, out=str(tmp_path / "b")))
    with pytest.raises(CheckpointError, match="does not exist"):
        trainer.train(trainer.TrainConfig(**{**common, "init": str(tmp_path / "nope.pt")},
                                          model_kwargs={"width": 8}, out=str(tmp_path / "c")))


def test_init_is_part_of_the_run_identity(base_run, tiny_shtech):
    cfg = trainer.TrainConfig.from_dict(json.loads((base_run.out / "config.json").read_text()))
    assert "init" in trainer.RUN_IDENTITY
    with pytest.raises(CrowdError, match=r"Cannot resume .*init: None ->"):
        trainer.train(trainer.TrainConfig.from_dict({**cfg.to_dict(), "resume": True, "init": str(base_run.best)}))
    argv = trainer.config_to_argv(trainer.TrainConfig(init="runs/x/best.pt", model_kwargs={"width": 8}))
    assert argv[argv.index("--init") + 1] == "runs/x/best.pt"
    parsed = trainer.config_from_args(cli.build_parser("train").parse_args(argv))
    assert parsed.init == "runs/x/best.pt" and parsed.model_kwargs == {"width": 8}
