"""The registered model's code (MLflow "models from code", no pickle): MLflow runs this file to load it."""

from mlflow.models import set_model

from qfm.registry.pyfunc import QfmScorer

set_model(QfmScorer())
