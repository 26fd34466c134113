#!/usr/bin/env bash
# GPU checks in one short run (a few minutes on one H100/H200):
#   1. the paper's configuration (deiqt_vit_s, ViT-S/16 at 224) trained for 300 steps with bf16 autocast
#      and channels_last, then 150 steps in fp32 side by side: crops/s and peak memory;
#   2. data-parallel training's cost on one GPU: the CPU preset's step plain and as 1 NCCL rank under torchrun;
#   3. the whole qfm chain (teacher -> DLE -> SNM -> QCC student -> evaluation) on one split, on CUDA,
#      through the `qfm protocol` command with the clive-dev recipe.
# Usage: bash benchmarks/gpu_smoke.sh LIVEC_ROOT OUT_DIR [QFM_COMMAND]
# LIVEC_ROOT may hold the JPEG images only: rows whose image is absent are skipped (and listed).
set -euo pipefail
root=${1:?usage: gpu_smoke.sh LIVEC_ROOT OUT_DIR [QFM_COMMAND]}
out=${2:?usage: gpu_smoke.sh LIVEC_ROOT OUT_DIR [QFM_COMMAND]}
qfm=${3:-qfm}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"

python3 "$here/gpu_train_vit.py" --root "$root" --steps 300 --batch 16 --crops 4 --workers 12 --json "$out/vit_bf16.json"
python3 "$here/gpu_train_vit.py" --root "$root" --steps 150 --batch 16 --crops 4 --workers 12 --fp32 \
    --json "$out/vit_fp32.json"

work=$(mktemp -d)
$qfm ingest --format livec --root "$root" --out "$work/manifest" --skip-invalid --quiet
python3 "$here/bench_ddp.py" --manifest "$work/manifest" --steps 20 --device cuda --json "$out/ddp_cuda.json"
start=$(date +%s)
$qfm protocol --manifest "$work/manifest" --out "$work/protocol" --params "$here/clive_params.yaml" \
    --splits split_0 --device cuda --set train_teacher.workers=8 --set train_student.workers=8 \
    --set pseudo_label.workers=8 --set build_bank.workers=8 --quiet
echo "protocol split_0 on CUDA: $(( $(date +%s) - start )) s"
cp "$work/protocol/protocol.json" "$out/protocol_cuda.json"
