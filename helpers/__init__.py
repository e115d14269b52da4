"""Shared code for the crowd-counting notebook series.

Each module owns one step of the pipeline (see ``docs/DESIGN.md``)::

    config       where things are, quick mode, device choice
    errors       the project's exception types
    fileio       atomic writes (checkpoints and caches never half-written)
    data         finding and reading datasets, splits, ``verify`` command
    synth        the synthetic crowd set, written in the ShanghaiTech layout
    explore      per-image statistics for dataset exploration
    density      Gaussian kernels, density maps, exact downsampling, HDF5 cache
    models       HeatmapCNN, CSRNet, VGG16 weights, receptive fields
    samples      the PyTorch dataset of training samples (exact targets at the model's stride)
    checkpoints  atomic saves and safe loads of checkpoints
    train        the training loop, resume, DDP, ``train`` command
    metrics      MAE, RMSE, GAME, peak finding and point matching
    viz          figures, and ``save_figure`` into ``report/figures/``

Importing the package does nothing but define names: no files are read or written.
"""

__version__ = "0.1.0"
