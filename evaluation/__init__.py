"""ddpm.evaluation: ``ddpm eval`` — how good samples are, each figure beside its real-vs-real scale.

    evaluate.py   evaluate(): the metrics for an npz or array against a reference data set
    metrics.py    energy distance (points), Frechet distance, precision / recall, the digits classifier check
    features.py   classifier features (a labelled proxy) and Inception pool3 features
    inception.py  the FID Inception-v3 (weights from a file the user gives: nothing is downloaded)
    reference.py  reference statistics of a data set, cached in an npz
    cli.py        the ``ddpm eval`` command (typer only at import)

It knows the core and the trainer's data sets (``ddpm.trainer.data``), nothing else; training imports none of it.
"""
