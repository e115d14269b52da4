# Setup. In Google Colab this cell installs the project; on your own machine it does nothing.
PROJECT_REPO_URL = "https://github.com/YOUR-ACCOUNT/crowd-counting-series.git"  # <- your copy of the project
import sys

if "google.colab" in sys.modules:
    import importlib
    import os
    import subprocess

    home = "/content/crowd-counting-series"
    if not os.path.exists(f"{home}/pyproject.toml"):
        if os.path.exists("/content/crowd-counting-series.zip"):  # or upload a zip of the project
            subprocess.run(["unzip", "-q", "/content/crowd-counting-series.zip", "-d", "/content"], check=True)
        else:
            subprocess.run(["git", "clone", "--depth", "1", PROJECT_REPO_URL, home], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", home], check=True)
    importlib.invalidate_caches()
    os.environ.setdefault("CROWD_HOME", home)
    print("Project installed. For the real dataset, copy ShanghaiTech to Google Drive, mount it\n"
          "(from google.colab import drive; drive.mount('/content/drive')) and set\n"
          "os.environ['CROWD_DATA'] = '/content/drive/MyDrive/ShanghaiTech' (see data/README.md).")
