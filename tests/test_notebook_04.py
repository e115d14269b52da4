"""Software checks moved out of notebook 04 (CSRNet): the command lines it shows are real.

The notebook prints the ``crowd train`` command of its recipe with
``helpers.tools.trainer.config_to_argv`` and shows further commands in its text (resume,
``torchrun``, a time budget). These tests check that those arguments give back the recipe's
configuration, that every command in the text parses, and that ``crowd train --help`` lists the
options the notebook talks about. The teaching checks stay in the notebook.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.tools import cli, recipes, trainer

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "04_csrnet.ipynb"


def _cells(kind: str) -> list[str]:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == kind]


def _parse(argv: list[str]) -> trainer.TrainConfig:
    return trainer.config_from_args(cli.build_parser("train").parse_args(argv))


def shown_train_commands() -> list[list[str]]:
    """The ``crowd train`` / ``torchrun ... -m helpers train`` commands of the notebook's text,
    as argument lists after ``train`` (backslash continuations joined, ``[...]`` made plain)."""
    commands = []
    for text in _cells("markdown"):
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("#", 1)[0].replace("[", "").replace("]", "").strip()
                match = re.match(r"^(?:crowd train|torchrun (?:--\S+ )*-m helpers train)\b(.*)$", line)
                if match:
                    commands.append(shlex.split(match.group(1)))
    return commands


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
@pytest.mark.parametrize("quick", [False, True], ids=["full", "quick"])
@pytest.mark.parametrize("part", ["A", "B"])
def test_recipe_command_line_gives_the_recipe(part, quick, kind):
    cfg = recipes.recommended_config("csrnet", part, f"runs/csrnet_{part}", quick=quick, kind=kind)
    argv = trainer.config_to_argv(cfg)
    parsed = _parse(argv)
    assert parsed.to_dict() == cfg.to_dict()
    # independent of config_to_argv's own round trip: the recipe's table, field by field
    for key, value in recipes.recipe_settings("csrnet", part, quick=quick, kind=kind).items():
        assert getattr(parsed, key) == value, key
    assert parsed.model == "csrnet" and parsed.part == part


def test_every_command_in_the_text_parses():
    commands = shown_train_commands()
    assert len(commands) >= 4, commands  # the recipe, resume, torchrun, a CPU budget
    for argv in commands:
        args = cli.build_parser("train").parse_args(argv)  # a usage error exits (SystemExit)
        assert args.out, f"every command shown names its run folder: {argv}"
    flat = [" ".join(a) for a in commands]
    assert any("--resume" in c for c in flat) and any("--max-minutes" in c for c in flat)


def test_the_recipe_commands_in_the_text_are_the_recipes():
    """The commands the text gives for the recipes (part B: runs/csrnet_B_gpu for the GPU recipe,
    runs/csrnet_B for the CPU one) are the recipes; every other full command trains one of them."""
    commands = shown_train_commands()
    expected = {kind: recipes.recommended_config("csrnet", "B", out, quick=False, kind=kind)
                for kind, out in (("gpu", "runs/csrnet_B_gpu"), ("cpu", "runs/csrnet_B"))}
    for kind, cfg in expected.items():
        shown = [argv for argv in commands if "--model" in argv and argv[argv.index("--out") + 1] == cfg.out]
        assert len(shown) == 1, (kind, shown)
        assert _parse(shown[0]).to_dict() == cfg.to_dict()
    # the other full-recipe commands of the text (4 GPUs, a CPU budget, the point loss) train the
    # recipe named by their folder, except for the settings they change on purpose
    others = [argv for argv in commands if "--model" in argv
              and argv[argv.index("--out") + 1] not in ("runs/csrnet_B_gpu", "runs/csrnet_B")]
    assert len(others) >= 3, others
    for argv in others:
        parsed = _parse(argv).to_dict()
        base = expected["gpu" if "_gpu" in argv[argv.index("--out") + 1] else "cpu"].to_dict()
        free = {"out", "max_minutes"} | ({"loss", "loss_kwargs"} if "--loss" in argv else set())
        for key, value in base.items():
            if key not in free:
                assert parsed[key] == value, (argv, key)
        if "--loss" in argv:  # the point loss with the length the recipe gives it at full resolution
            point = recipes.recommended_config("csrnet", "B", "x", quick=False, kind="gpu", loss=parsed["loss"])
            assert parsed["loss_kwargs"] == point.loss_kwargs


def test_the_text_and_the_training_cell_say_which_recipe_runs():
    code = "\n".join(_cells("code"))
    assert 'recipes.choose_recipe("csrnet")' in code
    assert "RECIPE.upper()} recipe ({RECIPE_REASON})" in code  # "GPU recipe (CUDA found)" / "CPU recipe (no GPU)"
    text = "\n".join(_cells("markdown"))
    assert "GPU recipe" in text and "not measured here" in text and "69.3" in text


def test_settings_cell_defaults_to_part_b_and_names_runs_with_run_folder():
    """The series' default path: a settings cell (QUICK, PART = "B") after the Colab cell, and the run
    folders come from recipes.run_folder (mode and data in the name), so 05 finds this CSRNet."""
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    settings = code[1]  # code[0] is the Colab setup cell
    assert 'QUICK = True' in settings and 'PART = "B"' in settings
    assert "config.use_settings(quick=QUICK)" in settings and 'report.plan_markdown("04")' in settings
    assert not any("config.quick_mode()" in c for c in code), "QUICK comes from the settings cell"
    assert sum(bool(re.search(r"^\s*PART\s*=", c, re.M)) for c in code) == 1, "PART is set only in the settings cell"
    joined = "\n".join(code)
    assert 'RUN_DIR = recipes.run_folder("csrnet", PART, source)' in joined
    assert "runs_root() /" not in joined, "run folders come from recipes.run_folder"
    assert joined.count('recipes.run_folder("csrnet", PART, source, tag=') == 1  # the comparison runs
    text = "\n".join(_cells("markdown"))
    assert "Part A\nMAE 68.2, Part B MAE 10.6" in text or "Part A MAE 68.2, Part B 10.6" in text
    assert "--resume" in text and "disconnect" in text and "Drive" in text


def test_comparison_runs_and_the_main_run_never_share_a_folder(tmp_path):
    from helpers.data import DataSource

    for synthetic in (False, True):
        source = DataSource(tmp_path, synthetic=synthetic, origin="test")
        for quick in (False, True):
            folders = [recipes.run_folder("csrnet", "B", source, quick=quick, root=tmp_path, tag=tag)
                       for tag in ("", "compare_imagenet", "compare_random", "4gpu")]
            assert len(set(folders)) == 4 and all(f.parent == tmp_path for f in folders)
            assert folders[0].name == "csrnet_B" + ("_synthetic" if synthetic else "") + ("_quick" if quick else "")


def test_help_lists_the_options_the_notebook_uses():
    run = subprocess.run([sys.executable, "-m", "helpers", "train", "--help"], capture_output=True,
                         text=True, timeout=300, check=True)
    used = {word for argv in shown_train_commands() for word in argv if word.startswith("--")}
    text = "\n".join(_cells("markdown"))
    used |= set(re.findall(r"`(--[a-z][a-z-]+)", text))
    assert {"--resume", "--epochs", "--max-minutes", "--pretrained", "--out"} <= used
    missing = sorted(option for option in used if option not in run.stdout)
    assert not missing, missing


def test_notebook_uses_the_tools_not_copies_of_them():
    code = "\n".join(_cells("code"))
    assert "trainer.config_to_argv(" in code, "the command line comes from config_to_argv"
    assert "getsource" not in code, "show code with helpers.viz.show_source, not inspect"
    assert "show_source(train.train_step)" in code
    assert "trainer.train(" in code and "recipes.recommended_config(" in code
