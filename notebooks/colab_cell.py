# Setup. In Google Colab this cell installs the project and keeps your work on Google Drive;
# on your own machine it does nothing.
PROJECT_REPO_URL = "https://github.com/YOUR-ACCOUNT/crowd-counting-series.git"  # <- your copy of the project
USE_DRIVE = True  # Colab: keep runs/ and report/ on Google Drive (shared by the notebooks, kept after a disconnect)
DATASET_ZIP = ""  # Colab: e.g. "/content/drive/MyDrive/ShanghaiTech.zip", unpacked to the fast local disk
COLAB_ROOT = "/content"  # Colab's local disk: fast, but wiped when the runtime ends
import sys

if "google.colab" in sys.modules:
    import glob
    import importlib.util
    import os
    import shutil
    import subprocess
    import zipfile

    project = f"{COLAB_ROOT}/crowd-counting-series"
    if not glob.glob(f"{project}*/pyproject.toml"):
        zips = glob.glob(f"{project}*.zip")  # the project's zip (GitHub: Code > Download ZIP), uploaded
        if zips:
            zipfile.ZipFile(zips[0]).extractall(COLAB_ROOT)
        elif "YOUR-ACCOUNT" in PROJECT_REPO_URL:
            raise SystemExit("Set PROJECT_REPO_URL at the top of this cell to the address of your copy of the "
                             "project (e.g. your fork on GitHub), or upload the project's zip "
                             f"(crowd-counting-series*.zip) to {COLAB_ROOT}, then run this cell again.")
        else:
            subprocess.run(["git", "clone", "--depth", "1", PROJECT_REPO_URL, project], check=True)
    project = os.path.dirname(sorted(glob.glob(f"{project}*/pyproject.toml"))[0])
    # Install the project but leave what Colab ships (torch, numpy, ipywidgets...): add only what is missing.
    needs = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "scipy": "scipy",
             "h5py": "h5py", "cv2": "opencv-python-headless", "PIL": "pillow", "matplotlib": "matplotlib",
             "ipywidgets": "ipywidgets", "tqdm": "tqdm"}  # import name: package name
    missing = [package for module, package in needs.items() if importlib.util.find_spec(module) is None]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", project], check=True)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)
    importlib.invalidate_caches()
    home = project
    if USE_DRIVE:
        from google.colab import drive

        drive.mount(f"{COLAB_ROOT}/drive")
        home = f"{COLAB_ROOT}/drive/MyDrive/crowd-counting-series"
    os.makedirs(home, exist_ok=True)
    os.environ["CROWD_HOME"] = home  # runs/ and report/: on Drive, every notebook finds the same runs
    os.environ["CROWD_CACHE"] = f"{COLAB_ROOT}/crowd-cache"  # caches: local disk, rebuilt when needed
    if DATASET_ZIP:  # one big file from Drive is fast; thousands of small files through the mount are slow
        data_dir = f"{COLAB_ROOT}/ShanghaiTech"
        if not glob.glob(f"{data_dir}/**/part_[AB]*", recursive=True):
            shutil.copy(DATASET_ZIP, f"{COLAB_ROOT}/dataset.zip")
            zipfile.ZipFile(f"{COLAB_ROOT}/dataset.zip").extractall(data_dir)
        parts = sorted(glob.glob(f"{data_dir}/**/part_[AB]*", recursive=True))  # part_A or part_A_final
        if not parts:
            raise SystemExit(f"{DATASET_ZIP} holds no part_A or part_B folder: is it ShanghaiTech?")
        os.environ["CROWD_DATA"] = os.path.dirname(parts[0])  # the folder that holds the parts
    print(f"Project installed. Runs and report go to {home}\nData: "
          + os.environ.get("CROWD_DATA", "set DATASET_ZIP for ShanghaiTech (without it: a synthetic set)"))
