"""The notebooks' first cell in a stand-in Colab, uploads with ipywidgets 7.7.1 and 8, typed paths.

The setup cell (notebooks/colab_cell.py) runs in a subprocess with a stand-in ``google.colab``
package on PYTHONPATH (``drive.mount`` links the mount point to a folder that outlives the
"runtime", like Google Drive) and with ``subprocess.run`` recorded instead of run (no git, no
pip, no network). A student's settings (the cell's first lines) are set by rewriting those lines.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import config
from helpers.errors import CrowdError
from helpers.tools import runs

ROOT = Path(__file__).resolve().parents[1]
CELL = (ROOT / "notebooks" / "colab_cell.py").read_text(encoding="utf-8")
REAL_URL = "https://github.com/someone/crowd-counting-series.git"

#: Test-side bootstrap: record subprocess.run (a "git clone" makes the folder), load the stand-in
#: google.colab unless told not to, hide modules (as if not installed), exec the cell, save what
#: it did, then run the "notebook" code that follows the cell.
BOOTSTRAP = r"""
import json, os, subprocess, sys
cell_path, result_path, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
calls, real_run = [], subprocess.run

def record(cmd, *args, **kwargs):
    cmd = [str(c) for c in cmd]
    calls.append(cmd)
    if cmd[:2] == ["git", "clone"]:
        os.makedirs(cmd[-1])
        open(os.path.join(cmd[-1], "pyproject.toml"), "w").close()
    return subprocess.CompletedProcess(cmd, 0)

subprocess.run = record
for name in options["hide"]:
    sys.modules[name] = None
if options["colab"]:
    import google.colab
try:
    exec(compile(open(cell_path).read(), "colab_cell.py", "exec"), {"__name__": "__main__"})
finally:
    keys = ("CROWD_HOME", "CROWD_CACHE", "CROWD_DATA")
    with open(result_path, "w") as fh:
        json.dump({"calls": calls, "env": {k: os.environ.get(k) for k in keys}}, fh)
subprocess.run = real_run
for name in options["hide"]:
    del sys.modules[name]
exec(options["then"], {"__name__": "__main__"})
"""

DRIVE = '''import os
CLOUD = {cloud!r}  # what Google Drive keeps between runtimes


def mount(mountpoint, force_remount=False, **kwargs):
    os.makedirs(mountpoint, exist_ok=True)
    if not os.path.exists(os.path.join(mountpoint, "MyDrive")):
        os.symlink(CLOUD, os.path.join(mountpoint, "MyDrive"))
'''
FILES = '''UPLOADS = {}  # what the "browser" sends: {file name: bytes}


def upload():
    return dict(UPLOADS)
'''


def make_standin(folder: Path, cloud: Path) -> Path:
    """A stand-in ``google.colab`` (drive, files) under ``folder``; Drive keeps files in ``cloud``."""
    colab = folder / "google" / "colab"
    colab.mkdir(parents=True)
    (folder / "google" / "__init__.py").write_text('__path__ = __import__("pkgutil").extend_path(__path__, __name__)\n')
    (colab / "__init__.py").write_text("")
    (colab / "drive.py").write_text(DRIVE.format(cloud=str(cloud)))
    (colab / "files.py").write_text(FILES)
    cloud.mkdir(parents=True, exist_ok=True)
    return folder


def cell_with(**settings) -> str:
    """The cell with its setting lines (``NAME = ...``) set as a student would."""
    text = CELL
    for name, value in settings.items():
        text, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", text, flags=re.M)
        assert n == 1, f"the cell has no setting {name}"
    return text


@pytest.fixture()
def colab(tmp_path):
    """Run the cell in a fresh "runtime" process: returns run(settings, then=..., ...) -> result."""
    cloud = tmp_path / "google_drive"
    standin = make_standin(tmp_path / "standin", cloud)
    content = tmp_path / "content"  # the runtime's local disk (/content in Colab)

    def run(*, colab=True, hide=(), then="", expect_ok=True, **settings):
        content.mkdir(exist_ok=True)
        settings.setdefault("COLAB_ROOT", str(content))
        cell = tmp_path / "cell.py"
        cell.write_text(cell_with(**settings))
        result = tmp_path / "result.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CROWD_")}
        env.update(PYTHONPATH=str(standin), CROWD_QUICK="1", OMP_NUM_THREADS="1")
        options = json.dumps({"colab": colab, "hide": list(hide), "then": then})
        proc = subprocess.run([sys.executable, "-c", BOOTSTRAP, str(cell), str(result), options],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert (proc.returncode == 0) == expect_ok, proc.stdout + proc.stderr
        out = json.loads(result.read_text()) if result.exists() else {}
        return {"returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr, **out}

    run.content, run.cloud = content, cloud
    return run


def test_outside_colab_the_cell_does_nothing(colab):
    result = colab(colab=False)
    assert result["calls"] == [] and result["env"] == {"CROWD_HOME": None, "CROWD_CACHE": None, "CROWD_DATA": None}
    assert result["stdout"] == ""


def test_placeholder_url_stops_with_a_clear_message(colab):
    result = colab(expect_ok=False)
    assert result["returncode"] == 1 and result["calls"] == []  # no git clone of the placeholder
    assert "Set PROJECT_REPO_URL" in result["stderr"] and "zip" in result["stderr"]
    assert "Traceback" not in result["stderr"]
    assert not (colab.content / "crowd-counting-series").exists()


def test_uploaded_zip_of_the_project_needs_no_url(colab):
    colab.content.mkdir()
    with zipfile.ZipFile(colab.content / "crowd-counting-series-main.zip", "w") as z:  # GitHub's Download ZIP
        z.writestr("crowd-counting-series-main/pyproject.toml", "")
    result = colab(USE_DRIVE=False)
    project = colab.content / "crowd-counting-series-main"
    assert result["calls"] == [[sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(project)]]
    assert result["env"]["CROWD_HOME"] == str(project)


def test_drive_keeps_runs_and_caches_stay_local(colab):
    result = colab(PROJECT_REPO_URL=REAL_URL)
    project = colab.content / "crowd-counting-series"
    home = colab.content / "drive" / "MyDrive" / "crowd-counting-series"
    assert result["calls"] == [["git", "clone", "--depth", "1", REAL_URL, str(project)],
                               [sys.executable, "-m", "pip", "install", "-q", "--no-deps", str(project)]]
    assert result["env"] == {"CROWD_HOME": str(home), "CROWD_CACHE": str(colab.content / "crowd-cache"),
                             "CROWD_DATA": None}
    assert (colab.cloud / "crowd-counting-series").is_dir()  # on "Drive"
    assert "set DATASET_ZIP" in result["stdout"]


def test_without_drive_everything_stays_on_the_runtime(colab):
    result = colab(PROJECT_REPO_URL=REAL_URL, USE_DRIVE=False)
    assert result["env"]["CROWD_HOME"] == str(colab.content / "crowd-counting-series")
    assert not (colab.content / "drive").exists() and not any(colab.cloud.iterdir())


def test_installs_only_the_missing_dependencies(colab):
    result = colab(PROJECT_REPO_URL=REAL_URL, USE_DRIVE=False, hide=["h5py", "cv2"])
    pip = [c for c in result["calls"] if c[1:4] == ["-m", "pip", "install"]]
    assert pip[0][-2] == "--no-deps"  # the project itself: never upgrades torch, numpy, ipywidgets...
    assert pip[1][5:] == ["h5py", "opencv-python-headless"] and len(pip) == 2


def test_the_cell_knows_every_dependency_and_uses_the_standard_library_only():
    tree = ast.parse(CELL)
    needs = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "needs")
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    declared = {re.match(r"\s*\"([A-Za-z0-9_.-]+)", line).group(1).lower()
                for line in block.splitlines() if line.strip().startswith('"')}
    assert set(needs.values()) == declared
    for module in needs:
        assert importlib.util.find_spec(module) is not None, module  # the import names are right
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported - {"google"} <= set(sys.stdlib_module_names)


@pytest.mark.slow
def test_a_csrnet_run_on_drive_is_found_and_resumed_by_another_runtime(colab, tmp_path):
    """Runtime 1 (notebook 04) trains one epoch; its local disk is wiped (a disconnect); runtime 2
    (another notebook) finds the run on Drive and continues it from last.pt."""
    from conftest import write_tiny_shtech

    data = write_tiny_shtech(tmp_path / "ShanghaiTech")
    colab.cloud.mkdir(exist_ok=True)
    with zipfile.ZipFile(colab.cloud / "ShanghaiTech.zip", "w") as z:
        for f in data.rglob("*"):
            z.write(f, f.relative_to(tmp_path))
    settings = dict(PROJECT_REPO_URL=REAL_URL, DATASET_ZIP=str(colab.content / "drive/MyDrive/ShanghaiTech.zip"))
    train = ("from helpers import config\nfrom helpers.tools import cli\n"
             "out = config.runs_root() / 'csrnet_B'\n"
             "args = ['train', '--out', str(out), '--epochs', '{epochs}', '--workers', '0']\n"
             "more = ['--model', 'csrnet', '--pretrained', 'none', '--part', 'B', '--crop', '64', "
             "'--batch-size', '4', '--max-val', '1', '--json']\n"
             "assert cli.main(args + ({resume!r} and ['--resume'] or more)) == 0\n")
    first = colab(then=train.format(epochs=1, resume=False), **settings)
    local_data = colab.content / "ShanghaiTech" / "ShanghaiTech"
    assert first["env"]["CROWD_DATA"] == str(local_data)  # unpacked to the local disk, not read from Drive
    run_dir = colab.cloud / "crowd-counting-series" / "runs" / "csrnet_B"
    assert (run_dir / "last.pt").is_file() and (run_dir / "best.pt").is_file()
    assert any((colab.content / "crowd-cache").rglob("*")), "density caches go to the local disk"
    assert not (colab.cloud / "crowd-counting-series" / "build" / "cache").exists()

    shutil.rmtree(colab.content)  # the runtime ends: its local disk is gone, Drive stays
    find = ("import json\nfrom helpers.tools import runs\n"
            "print('RUNS', json.dumps([[r.name, r.model, r.part, r.epochs] for r in runs.find_runs()]))\n")
    second = colab(then=find + train.format(epochs=2, resume=True), **settings)
    found = json.loads(next(line for line in second["stdout"].splitlines() if line.startswith("RUNS "))[5:])
    assert found == [["csrnet_B", "csrnet", "B", 1]]
    history = (run_dir / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2"], history


# --------------------------------------------------------------------------- uploads


UPLOAD_SCRIPT = r"""
import json, sys
from datetime import datetime, timezone
import ipywidgets
from traitlets import TraitError
from helpers.tools import runs

expected, folder = sys.argv[1], sys.argv[2]
assert ipywidgets.__version__ == expected, ipywidgets.__version__
upload = ipywidgets.FileUpload(accept="image/*", multiple=False, description="upload a photo")
seen = []
upload.observe(lambda change: seen.append(bool(change["new"])), names="value")
content = bytes(range(256)) * 4000  # about 1 MB
meta = {"name": "my photo (1).jpg", "type": "image/jpeg", "size": len(content)}
if expected.startswith("7."):  # what the browser does in ipywidgets 7: data, metadata, a counter bump
    upload.metadata, upload.data = [dict(meta, lastModified=0)], [content]
    upload._counter += 1
    try:
        upload.value = {}
        raise AssertionError("the value of an ipywidgets 7 FileUpload should be read-only")
    except TraitError:
        pass
else:
    upload.value = (dict(meta, content=memoryview(content), last_modified=datetime.now(timezone.utc)),)
path = runs.save_upload(upload, folder)
assert runs.save_upload(upload.value, folder) == path
runs.clear_upload(upload)
from tqdm.notebook import tqdm  # what tqdm.auto shows in every notebook: a widget progress bar
assert sum(tqdm(range(3), desc="bar")) == 3
print(json.dumps({"name": path.name, "same": path.read_bytes() == content, "seen": seen,
                  "after": runs.save_upload(upload, folder) is None, "empty": not upload.value}))
"""


def load_tasks():
    """The project's tasks.py (at the repository root, not a package module)."""
    spec = importlib.util.spec_from_file_location("project_tasks", ROOT / "tasks.py")
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    return tasks


@pytest.fixture(scope="module")
def widgets7() -> Path:
    """build/ipywidgets7: ipywidgets 7.7.1 (what Colab ships) for PYTHONPATH, installed if missing."""
    try:
        return load_tasks().ensure_widgets7()
    except SystemExit as exc:
        pytest.skip(f"could not install ipywidgets 7.7.1 (no network?): {exc}")


@pytest.mark.parametrize("version", ["7.7.1", "8"])
def test_save_and_clear_upload_on_real_widgets(version, widgets7, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if version == "7.7.1":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(widgets7), env.get("PYTHONPATH")]))
    else:
        import ipywidgets

        version = ipywidgets.__version__
        assert version.startswith("8.")
    proc = subprocess.run([sys.executable, "-c", UPLOAD_SCRIPT, version, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"name": "my_photo_1_.jpg", "same": True, "seen": [True, False], "after": True, "empty": True}


def test_colab_upload_saves_the_first_file(tmp_path, monkeypatch):
    standin = make_standin(tmp_path / "standin", tmp_path / "cloud")
    monkeypatch.syspath_prepend(str(standin))
    for name in ("google", "google.colab", "google.colab.files"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    from google.colab import files

    photo = os.urandom(5_000_000)  # a phone photo of several MB
    monkeypatch.setattr(files, "UPLOADS", {"IMG 2024.jpg": photo, "second.jpg": b"x"})
    assert runs.in_colab()
    path = runs.colab_upload(tmp_path / "uploads")
    assert path == tmp_path / "uploads" / "IMG_2024.jpg" and path.read_bytes() == photo
    monkeypatch.setattr(files, "UPLOADS", {})
    assert runs.colab_upload(tmp_path / "uploads") is None


def test_colab_upload_outside_colab_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.colab", None)
    assert not runs.in_colab()
    with pytest.raises(CrowdError, match="only in Google Colab"):
        runs.colab_upload()


# --------------------------------------------------------------------------- typed and pasted paths


@pytest.mark.parametrize("text", ['"/data/My Photos/x.jpg"', "  '/data/My Photos/x.jpg' ",
                                  "/data/My Photos/x.jpg\n", ' "/data/My Photos/x.jpg" '])
def test_user_path_drops_quotes_and_spaces(text):
    assert config.user_path(text) == Path("/data/My Photos/x.jpg")


def test_user_path_expands_home_and_blank_is_none(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("USERPROFILE", str(tmp_path))
    assert config.user_path('"~/crowd.jpg"') == tmp_path / "crowd.jpg"
    assert config.user_path("") is None and config.user_path(' "" ') is None


def test_settings_accept_copied_paths(monkeypatch, tmp_path):
    for name in ("CROWD_DATA", "CROWD_HOME", "CROWD_CACHE"):
        monkeypatch.setenv(name, f' "{tmp_path / name}" ')
    assert config.env_data_root() == (tmp_path / "CROWD_DATA").resolve()
    assert config.project_root() == (tmp_path / "CROWD_HOME").resolve()
    assert config.cache_root() == (tmp_path / "CROWD_CACHE").resolve()
    monkeypatch.setenv("CROWD_DATA", "  ")
    assert config.env_data_root() is None


# --------------------------------------------------------------------------- tasks.py and the README


def test_readme_colab_links_come_from_one_setting():
    tasks = load_tasks()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert tasks.colab_links(readme) == readme, "README links are stale: run python3 tasks.py colab-links"
    repo, branch = tasks.COLAB_BLOCK.search(readme).group("repo", "branch")
    for text, owner in ((readme, repo), (tasks.colab_links(readme, repo="me/my-fork"), "me/my-fork")):
        links = re.findall(r"\(https://colab\.research\.google\.com/github/([^)]+)\)", text)
        assert sorted(links) == [f"{owner}/blob/{branch}/notebooks/{nb.name}" for nb in tasks.NOTEBOOKS]
        assert all((ROOT / link.split(f"/blob/{branch}/", 1)[1]).is_file() for link in links)


def test_second_widget_pass_covers_every_notebook_that_uses_widgets():
    tasks = load_tasks()
    names = {nb.name for nb in tasks.widget_notebooks()}
    for nb in tasks.NOTEBOOKS:
        code = [c for c in json.loads(nb.read_text(encoding="utf-8"))["cells"] if c["cell_type"] == "code"]
        uses = any(re.search(r"\bwidgets\.[A-Z]", "".join(c["source"])) for c in code[1:])  # widgets.Button...
        assert uses == (nb.name in names), nb.name
    assert "06_count_your_own_image.ipynb" in names
    check = tasks.write_version_check("7.7.1")
    assert "assert ipywidgets.__version__ == '7.7.1'" in check.read_text(encoding="utf-8")
