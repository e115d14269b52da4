"""Software checks of notebook 08 (beyond Gaussian targets): its structure and its toy.

The notebook's teaching checks stay in the notebook (nbval runs them). Here: the settings cell is
the series' one, the loss is chosen from validation numbers only and the test split is read once,
after the choice and for the chosen loss; the figure and the plan are known to the report; and
the toy cells (a prediction shifted by one cell, the OT term against an exact assignment) run
outside the notebook with their own assertions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from helpers.tools import recipes, report

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "08_beyond_gaussian_targets.ipynb"


def _code_cells() -> list[tuple[str, str]]:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    return [(c["id"], "".join(c["source"])) for c in cells if c["cell_type"] == "code"]


def _cell(cell_id: str) -> str:
    return dict(_code_cells())[cell_id]


def test_first_cells_are_the_colab_cell_and_the_settings():
    code = _code_cells()
    assert code[0][1] == (REPO / "notebooks" / "colab_cell.py").read_text(encoding="utf-8").rstrip("\n")
    settings = code[1][1]
    for line in ('QUICK = True', 'PART = "B"', "QUICK = config.use_settings(quick=QUICK)",
                 'display(Markdown(report.plan_markdown("08")))'):
        assert line in settings, line


def test_the_choice_reads_validation_only_and_test_comes_after_it():
    code = _code_cells()
    ids = [cid for cid, _ in code]
    choice = next(i for i, (_, src) in enumerate(code) if "CHOSEN =" in src)
    chosen_line = next(line for line in code[choice][1].splitlines() if line.startswith("CHOSEN ="))
    assert '"val MAE"' in chosen_line and "test" not in chosen_line.lower()
    assert "test" not in code[choice][1].lower()
    # nothing before the choice reads the test split
    for cid, src in code[:choice]:
        assert not re.search(r"""["']test["']""", src), f"cell {cid} reads the test split before the choice"
    # the test split is read once, after the choice, for the chosen run only
    test_cells = [cid for cid, src in code if re.search(r"""["']test["']""", src)]
    assert test_cells == ["n8test"] and ids.index("n8test") > choice
    assert "results[CHOSEN].best" in _cell("n8test")


def test_every_loss_goes_through_the_recipe_and_its_own_run_folder():
    cfg_cell = _cell("n8cfg")
    assert 'LOSSES = ("mse", "bayesian", "dm_count")' in cfg_cell
    assert 'tag=f"loss_{name}"' in cfg_cell and "recipes.recommended_config(" in cfg_cell
    for name in ("mse", "bayesian", "dm_count"):
        cfg = recipes.recommended_config("heatmap_cnn", "B", f"runs/x_{name}", quick=True, loss=name)
        assert cfg.loss == name
    assert "trainer.train(configs[name])" in _cell("n8train")


def test_report_knows_the_figure_and_the_plan():
    assert "08_loss_comparison" in report.FIGURES
    assert 'name=f"08_loss_comparison_{PART}"' in _cell("n8train")
    plan = report.PLAN["08"]
    assert plan.file == NOTEBOOK.name
    assert plan.times[("CPU", "quick")].measured and not plan.times[("CPU", "full")].measured


def test_toy_cells_run_and_their_numbers_are_right():
    """The toy cells, run outside the notebook: their own asserts, plus independent numbers."""
    shown = []
    namespace = {"display": shown.append, "Markdown": str}
    for cid in ("n8toy", "n8toychk", "n8ot"):
        exec(compile(_cell(cid), f"<notebook 08 cell {cid}>", "exec"), namespace)  # noqa: S102
    one_per_head = namespace["one_per_head"]
    # the notebook's helper puts one person in each head's cell, moved to the right
    moved = one_per_head(1)[0, 0]
    assert float(moved.sum()) == 2.0
    assert moved[1, 2] == 1.0 and moved[3, 3] == 1.0  # heads (12, 12) and (20, 28): cells (1, 1), (3, 2)
    # a one-cell (8 px) shift of equal halves: exact transport cost 8^2 = 64 px^2 per unit mass
    assert abs(namespace["exact_cost"] - 64.0) < 1e-6
    # MSE of the in-place prediction against the target, by hand: sum of squared differences
    target = namespace["target"][0, 0]
    expected = 100 * float(((one_per_head(0)[0, 0] - target) ** 2).sum())
    assert abs(namespace["toy"]["1 per head, in place"]["MSE x 100 (sum over cells)"] - expected) < 1e-9
    assert torch.isclose(target.sum(), torch.tensor(2.0), atol=1e-4)  # the Gaussian map keeps the count
    assert shown, "the toy table is displayed"
