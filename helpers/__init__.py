"""The core of the crowd-counting series: what the notebooks teach, in the order they teach it.

    01 dataset    data       list_records, read_image, read_points, clean_points, split_fit_val
    02 ground     density    knn_distances, adaptive_sigmas, density_map, downsample_density
       truth
    03 our CNN    samples    CrowdDataset (crops, flips, rescaling; exact targets at the stride)
                  models     HeatmapCNN, receptive_field, count_parameters
                  train      density_loss, train_step, train_one_epoch, evaluate_counts, fit
    04 CSRNet     models     CSRNet, load_vgg16_frontend, build_model
    05 evaluation metrics    mae, rmse, game, find_peaks, match_points, scores_from_counts
    06 your image predict    prepare_image, count, context_margin
    next steps    losses     bayesian_loss, dm_count_loss, sinkhorn (learning from the points)
    (all)         config, errors  settings (CROWD_DATA, CROWD_QUICK, ...), CrowdError and its kinds

``helpers.tools`` (trainer, cache, checkpoints, inference, evaluate, the ``crowd`` command line)
and ``helpers.viz`` (figures) build on these; see docs/DESIGN.md. Importing does nothing else.
"""

__version__ = "0.2.0"
