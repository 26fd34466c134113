"""The DLE -> SNM -> QCC student chain in one process, as tests/test_distributed.py runs it: plainly, or under
torchrun (each rank runs this script): python tests/ddp_chain.py MANIFEST TEACHER PARAMS OUT."""

import sys
from pathlib import Path

from qfm.config import load_params
from qfm.steps.bank import build_bank
from qfm.steps.pseudo_label import pseudo_label
from qfm.steps.student import train_student

manifest, teacher, params_file, out = sys.argv[1:5]
params, out = load_params(params_file), Path(out)
pseudo_label(manifest, teacher, out / "pseudo", params["pseudo_label"], params["run"], progress=False)
build_bank(manifest, teacher, out / "pseudo", out / "bank", params["build_bank"], params["run"], progress=False)
train_student(manifest, out / "student", params["train_student"], params["run"], teacher_dir=teacher,
              pseudo_dir=out / "pseudo", bank_dir=out / "bank", progress=False)
