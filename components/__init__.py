"""One Kubeflow component per pipeline step; each calls the same qfm library function as its DVC stage.

Light imports only at module level (kfp.dsl); qfm and torch are imported inside each component's body.
"""

from components.build_bank import build_bank
from components.evaluate import evaluate
from components.ingest import ingest
from components.promote import promote
from components.pseudo_label import pseudo_label
from components.train_student import train_student
from components.train_teacher import train_teacher
from components.validate import validate

__all__ = ["build_bank", "evaluate", "ingest", "promote", "pseudo_label", "train_student", "train_teacher", "validate"]
