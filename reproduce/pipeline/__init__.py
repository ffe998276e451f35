"""The pipeline around dvc.yaml: running its out-of-date stages in parallel (``parallel``)."""
