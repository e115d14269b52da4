"""CSRNet figures: tap arithmetic checked against autograd, every figure drawn and saved."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from helpers.analysis.diagnostics import stacked_taps
from helpers.models import CSRNet, receptive_field
from helpers.viz import csrnet as viz


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CROWD_HOME", str(tmp_path))
    import matplotlib

    matplotlib.use("Agg")
    yield tmp_path
    import matplotlib.pyplot as plt

    plt.close("all")


def _autograd_paths(layers) -> np.ndarray:
    """Path counts by differentiation: a 1-D chain of all-ones convolutions, d(out[centre])/d(in)."""
    import torch

    convs = [torch.nn.Conv1d(1, 1, L.kernel, stride=L.stride, dilation=L.dilation, bias=False).double()
             for L in layers]
    for c in convs:
        torch.nn.init.ones_(c.weight)
    rf = receptive_field(torch.nn.Sequential(*[torch.nn.Conv2d(1, 1, L.kernel, stride=L.stride,
                                                               dilation=L.dilation) for L in layers]))[-1].rf
    x = torch.zeros(1, 1, rf, dtype=torch.float64, requires_grad=True)
    y = x
    for c in convs:
        y = c(y)
    assert y.shape[-1] == 1  # exactly one output sees exactly the receptive field
    y.sum().backward()
    return x.grad[0, 0].numpy()


def test_input_paths_match_autograd_and_stacked_taps():
    chain = [SimpleNamespace(kernel=3, stride=1, dilation=1), SimpleNamespace(kernel=2, stride=2, dilation=1),
             SimpleNamespace(kernel=3, stride=1, dilation=2), SimpleNamespace(kernel=3, stride=1, dilation=3)]
    np.testing.assert_array_equal(viz.input_paths_1d(chain), _autograd_paths(chain))
    two = [SimpleNamespace(kernel=3, stride=1, dilation=2)] * 3
    np.testing.assert_array_equal(viz.input_paths_1d(two), stacked_taps([2, 2, 2])[0])


def test_csrnet_paths_cover_the_whole_receptive_field():
    rows = receptive_field(CSRNet())
    line = viz.input_paths_1d(rows)
    assert len(line) == rows[-1].rf == 284
    assert (line > 0).all()
    assert line.sum() == 3**16 * 2**3  # 16 3x3 convs and three 2x2 pools per axis
    backend = viz.input_paths_1d([r for r in rows if r.name.startswith("backend.")])
    assert (backend[1::2] == 0).all() and (backend[::2] > 0).all()


def test_figures_are_drawn_and_saved(home):
    from matplotlib.figure import Figure

    fig = viz.plot_csrnet_coverage(receptive_field(CSRNet()), name="t_cov")
    assert isinstance(fig, Figure) and len(fig.axes) == 3  # two panels and a colour bar
    # six dilation-2 layers: 13 of 25 feature-map rows and columns seen, 1 - 169/625 = 73% unseen
    assert "73%" in fig.axes[0].get_title()
    assert "RF 284 px, 0 unseen" in " ".join(t.get_text() for t in fig.axes[1].get_legend().get_texts())
    rows = [{"epoch": e, "train_loss": 1.0 / e, "val_mae": 10.0 / e} for e in (1, 2, 3)]
    fig = viz.plot_pretrained_comparison({"a": rows, "b": SimpleNamespace(history=rows)}, name="t_cmp")
    assert isinstance(fig, Figure)
    for stem in ("t_cov", "t_cmp"):
        for ext in ("png", "pdf"):
            assert (home / "report" / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    with pytest.raises(ValueError):
        viz.plot_pretrained_comparison({})
    with pytest.raises(ValueError):
        viz.plot_csrnet_coverage([])
