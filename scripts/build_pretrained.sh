#!/usr/bin/env bash
# Rebuild the pretrained model that ships in the package (qfm/pretrained/) from the LIVE In the Wild Challenge
# database (clive-dev or the full release), reproducibly: one torch thread, fixed seeds.
#
#   bash scripts/build_pretrained.sh CHALLENGEDB_RELEASE_FOLDER [WORK_FOLDER]
#
# CHALLENGEDB_RELEASE_FOLDER: the database's ChallengeDB_release folder, as released.
# WORK_FOLDER: where the manifest and the training run go (default: a new folder under ${TMPDIR:-/tmp}); it
# stays outside git. The recipe is PARAMS (default benchmarks/clive_params.yaml, the CPU preset) with the
# student's switches of the row chosen on validation by the final study (benchmarks/studies/final.yaml,
# row `baseline`: the plain fine-tune); set PARAMS / SWITCHES to rebuild with another recipe. On the same
# machine, software and thread count, the same weights come out.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/build_pretrained.sh CHALLENGEDB_RELEASE_FOLDER [WORK_FOLDER]" >&2
  exit 2
fi
root="$1"
cd "$(dirname "$0")/.."
work="${2:-$(mktemp -d "${TMPDIR:-/tmp}/qfm-pretrained-XXXXXX")}"
params="${PARAMS:-benchmarks/clive_params.yaml}"
switches="${SWITCHES:---set train_student.qcc=false --set train_student.use_pseudo_labels=false}"
venv="${QFM_VENV:-.venv}"
qfm="$venv/bin/python -m qfm"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # with run.threads=1 below: one thread, the same weights each time
export PYTHONHASHSEED=0
mkdir -p "$work"
$qfm ingest --format livec --root "$root" --out "$work/ingest" --quiet
# shellcheck disable=SC2086  # $switches is a list of flags
$qfm train-final --manifest "$work/ingest" --out "$work/final" --params "$params" $switches \
  --set run.threads=1 --set run.device=cpu --set tracking.enabled=false --val-fraction 0.1 --seed 2024 \
  --package qfm/pretrained --card-notes scripts/pretrained/clive-dev.md \
  --command-line "bash scripts/build_pretrained.sh CHALLENGEDB_RELEASE_FOLDER  (PARAMS=$params SWITCHES='$switches')" \
  ${QFM_RESUME:+--resume} --quiet
du -b qfm/pretrained/*
echo "qfm: packaged model rebuilt in qfm/pretrained/ (training run and manifest in $work)"
