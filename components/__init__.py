"""One Kubeflow component per pipeline step; each calls the same qfm library function as its DVC stage (the
study_* components: the pieces of `qfm study`, for pipelines/qfm_study_pipeline.py).

Light imports only at module level (kfp.dsl); qfm and torch are imported inside each component's body.
"""

from components.build_bank import build_bank
from components.evaluate import evaluate
from components.ingest import ingest
from components.promote import promote
from components.pseudo_label import pseudo_label
from components.study_gather import study_gather
from components.study_plan import study_plan
from components.study_report import study_report
from components.study_row import study_row
from components.study_units import study_units
from components.train_final import train_final
from components.train_student import train_student
from components.train_teacher import train_teacher
from components.validate import validate

__all__ = ["build_bank", "evaluate", "ingest", "promote", "pseudo_label", "study_gather", "study_plan", "study_report",
           "study_row", "study_units", "train_final", "train_student", "train_teacher", "validate"]
