"""The project's two commands on every OS (Linux, macOS, Windows), with only the standard library.

    python tasks.py run [--full]   # create .venv if missing, then execute every notebook in order
    python tasks.py test           # create .venv if missing, then the unit tests and every notebook
                                   # under nbval, and the widget notebooks again with ipywidgets 7.7.1
    python tasks.py venv           # only create .venv and install the project into it
    python tasks.py widgets7       # only install the ipywidgets 7.7.1 overlay (build/ipywidgets7)
    python tasks.py colab-cell     # copy notebooks/colab_cell.py into each notebook's first code cell
    python tasks.py colab-links --repo YOU/crowd-counting-series   # README's "Open in Colab" links

On Windows use ``py tasks.py ...``. ``make run`` / ``make test`` call this file. Quick mode
(``CROWD_QUICK=1``) is the default unless CROWD_QUICK is set; ``run --full`` sets it to 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".installed"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
#: Colab ships ipywidgets 7.7.1; the widget notebooks are tested with it as well as with 8.x.
WIDGETS7 = ("ipywidgets==7.7.1", "ipython_genutils==0.2.0")  # the kernel side only needs these two
WIDGETS7_DIR = ROOT / "build" / "ipywidgets7"
NBVAL = ["-m", "pytest", "-q", "--nbval-lax", "--nbval-current-env", "--durations=3", "-p", "no:cacheprovider"]


def venv_python() -> Path:
    """The interpreter of .venv (``.venv/bin/python``, on Windows ``.venv\\Scripts\\python.exe``)."""
    windows = VENV / "Scripts" / "python.exe"
    return windows if os.name == "nt" else VENV / "bin" / "python"


def call(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> int:
    """Run the .venv interpreter with ``args`` in the project folder; returns its exit status."""
    return subprocess.run([str(venv_python()), *map(str, args)], cwd=ROOT, env=env).returncode


def ensure_venv() -> None:
    """Create .venv if missing and install the project (``-e .[dev]``) and its Jupyter kernel into it,
    again whenever pyproject.toml is newer than the last install."""
    if not venv_python().exists():
        print(f"creating {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    pyproject = ROOT / "pyproject.toml"
    if STAMP.exists() and STAMP.stat().st_mtime >= pyproject.stat().st_mtime:
        return
    print("installing the project into .venv (the first time: PyTorch and the rest, a few minutes)")
    steps = [["-m", "pip", "install", "--quiet", "-e", ".[dev]"],
             ["-m", "ipykernel", "install", "--sys-prefix", "--name", "python3", "--display-name", "Python 3"]]
    for step in steps:
        if call(*step) != 0:
            sys.exit(f"failed: {venv_python()} {' '.join(step)}")
    STAMP.touch()


def ensure_widgets7() -> Path:
    """Install ipywidgets 7.7.1 (what Colab ships) into build/ipywidgets7, an overlay put first on
    PYTHONPATH for a second pass over the widget notebooks; .venv keeps ipywidgets 8."""
    if not (WIDGETS7_DIR / "ipywidgets-7.7.1.dist-info").is_dir():
        args = ["-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", WIDGETS7_DIR, *WIDGETS7]
        if call(*args) != 0:
            sys.exit("failed to install the ipywidgets 7.7.1 overlay (pip install --target build/ipywidgets7)")
    return WIDGETS7_DIR


def widget_notebooks() -> list[Path]:
    """The notebooks whose own code (after the setup cell) imports ipywidgets. (tqdm's progress bars,
    widgets too, work with both versions: tests/test_colab_setup.py checks them.)"""
    def code(nb: Path) -> str:
        cells = [c for c in json.loads(nb.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
        return "\n".join("".join(c["source"]) for c in cells[1:])

    return [nb for nb in NOTEBOOKS if re.search(r"^\s*(import|from) ipywidgets\b", code(nb), re.M)]


def write_version_check(version: str) -> Path:
    """A one-cell notebook (in build/) asserting the kernel imports ipywidgets ``version``."""
    source = (f"import ipywidgets\nprint('kernel ipywidgets', ipywidgets.__version__, ipywidgets.__file__)\n"
              f"assert ipywidgets.__version__ == {version!r}, ipywidgets.__version__")
    cell = {"cell_type": "code", "execution_count": None, "id": "check", "metadata": {}, "outputs": [],
            "source": source}
    nb = {"cells": [cell], "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                                      "name": "python3"}}, "nbformat": 4, "nbformat_minor": 5}
    path = ROOT / "build" / "ipywidgets_version_check.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1) + "\n", encoding="utf-8")
    return path


def timed(label: str, *args: str | os.PathLike[str], env: dict[str, str] | None = None,
          times: list[str]) -> bool:
    """Run the .venv interpreter with ``args``, print the label first and record the time taken."""
    print(f"== {label}", flush=True)
    start = time.monotonic()
    ok = call(*args, env=env) == 0
    times.append(f"{time.monotonic() - start:6.0f} s  {label}{'' if ok else '  FAILED'}")
    return ok


def run_notebooks() -> int:
    """Execute every notebook in order into build/notebooks (outputs kept there); stop at a failure."""
    out = ROOT / "build" / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    times: list[str] = []
    for nb in NOTEBOOKS:
        args = ["-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--ExecutePreprocessor.timeout=-1",
                "--ExecutePreprocessor.kernel_name=python3", "--output-dir", out, nb]
        if not timed(f"{nb.relative_to(ROOT)} (CROWD_QUICK={os.environ['CROWD_QUICK']})", *args, times=times):
            return 1
        print(times[-1])
    return 0


def test() -> int:
    """Unit tests, every notebook under nbval, then the widget notebooks with ipywidgets 7.7.1."""
    times: list[str] = []
    ok = timed("unit tests", "-m", "pytest", "-q", "tests", times=times)
    series = time.monotonic()
    for nb in NOTEBOOKS:
        ok &= timed(f"{nb.relative_to(ROOT)} (nbval)", *NBVAL, nb, times=times)
    old = ensure_widgets7()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(old), os.environ.get("PYTHONPATH")]))}
    ok &= timed("kernel ipywidgets is 7.7.1", *NBVAL, write_version_check("7.7.1"), env=env, times=times)
    for nb in widget_notebooks():
        ok &= timed(f"{nb.relative_to(ROOT)} (nbval, ipywidgets 7.7.1)", *NBVAL, nb, env=env, times=times)
    print(f"Run times (quick mode = {os.environ['CROWD_QUICK']}):")
    print("\n".join(times))
    print(f"{time.monotonic() - series:6.0f} s  all notebooks")
    return 0 if ok else 1


def sync_colab_cell() -> int:
    """Write notebooks/colab_cell.py into the first code cell of every notebook; nothing else changes."""
    text = (ROOT / "notebooks" / "colab_cell.py").read_text(encoding="utf-8").strip()
    lines = text.splitlines(keepends=True)
    for nb_path in NOTEBOOKS:
        raw = nb_path.read_text(encoding="utf-8")
        nb = json.loads(raw)
        cell = next(c for c in nb["cells"] if c["cell_type"] == "code")
        if "".join(cell["source"]).strip() == text:
            continue
        cell["source"] = lines
        nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"updated {nb_path.relative_to(ROOT)}")
    return 0


COLAB_BLOCK = re.compile(r"<!-- colab-links: (?P<repo>[\w.-]+/[\w.-]+)@(?P<branch>[\w./-]+) -->\n(?P<body>.*?)"
                         r"<!-- /colab-links -->", re.S)


def colab_links(readme: str, repo: str | None = None, branch: str | None = None) -> str:
    """``readme`` with its block of "Open in Colab" links rebuilt, one per notebook, from the block's
    one setting ``<!-- colab-links: OWNER/REPO@BRANCH -->`` (changed to ``repo``/``branch`` if given)."""
    found = COLAB_BLOCK.search(readme)
    if found is None:
        sys.exit("README.md has no <!-- colab-links: OWNER/REPO@BRANCH --> ... <!-- /colab-links --> block")
    repo, branch = repo or found["repo"], branch or found["branch"]
    badge = "https://colab.research.google.com/assets/colab-badge.svg"
    rows = [f"| `{nb.stem}` | [![Open In Colab]({badge})](https://colab.research.google.com/github/{repo}/blob/"
            f"{branch}/notebooks/{nb.name}) |" for nb in NOTEBOOKS]
    block = "\n".join([f"<!-- colab-links: {repo}@{branch} -->", "| notebook | |", "|---|---|", *rows,
                       "<!-- /colab-links -->"])
    return readme[:found.start()] + block + readme[found.end():]


def write_colab_links(repo: str | None, branch: str | None) -> int:
    """Rewrite README.md's "Open in Colab" links (for ``repo``/``branch`` if given)."""
    readme = ROOT / "README.md"
    readme.write_text(colab_links(readme.read_text(encoding="utf-8"), repo, branch), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["run", "test", "venv", "widgets7", "colab-cell", "colab-links"])
    parser.add_argument("--full", action="store_true", help="run: full size (CROWD_QUICK=0)")
    parser.add_argument("--repo", help="colab-links: your copy on GitHub, OWNER/REPO")
    parser.add_argument("--branch", help="colab-links: its branch (default: as in README.md)")
    args = parser.parse_args(argv)
    os.environ["CROWD_QUICK"] = "0" if args.full else os.environ.get("CROWD_QUICK", "1")
    if args.task == "colab-cell":
        return sync_colab_cell()
    if args.task == "colab-links":
        return write_colab_links(args.repo, args.branch)
    ensure_venv()
    if args.task == "widgets7":
        print(ensure_widgets7())
        return 0
    return {"run": run_notebooks, "test": test}.get(args.task, lambda: 0)()


if __name__ == "__main__":
    sys.exit(main())
