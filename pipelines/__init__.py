"""The QFM-IQM Kubeflow pipeline (kfp v2): its definition, and entry points to compile, submit and run it
locally (`python -m pipelines.compile | submit | local_run`)."""
