#!/usr/bin/env bash
# One prepared run for a lent GPU machine (torch and triton already installed there, no network):
# the CUDA test suite, the sm_80/sm_90 compile check, the loss sweep and the metrics benchmark.
# Everything it writes goes under $OUT (default: benchmarks/results/gpu-run); commit those files
# under benchmarks/results/ with the GPU name, versions and commit they record.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # no install step: the machine has no network

{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$out/environment.txt" 2>&1
cat "$out/environment.txt"

# 1. The whole suite, CUDA tests included (they skip on CPU machines). Test files whose cross-check
#    libraries (pytorch-metric-learning, scikit-learn) are missing there fail to collect; the rest run.
timeout 300 python -m pytest -q -p no:cacheprovider tests --continue-on-collection-errors \
  --junitxml="$out/pytest.xml" > "$out/pytest.txt" 2>&1
echo "pytest exit $?"; tail -5 "$out/pytest.txt"

# 2. The roofline model's predictions for this GPU (H100 or H200 by name; h100 otherwise), then
# the loss sweep on the GPU (fp32 and bf16), each measurement printed and saved with its
# prediction and measured / predicted, then the metrics engine at SOP size. Three losses (one per
# family and the K = 1 baseline) keep the sweep within its timeout; results are rewritten after
# every case, so a cut sweep keeps what it measured.
gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
case "$gpu_name" in *H200*) model=h200 ;; *) model=h100 ;; esac
timeout 120 python -m benchmarks --predict "$model" --out "$out" > "$out/predicted.txt" 2>&1
echo "prediction ($model) exit $?"
timeout 300 python -m benchmarks --device cuda --repeats 10 --losses mpa,mpa_ap,proxy_anchor \
  --roofline "$model" --out "$out" > "$out/sweep.txt" 2>&1
echo "sweep exit $?"; tail -15 "$out/sweep.txt"
# Every measurement beside its prediction, and those more than 1.5x off it.
for f in "$out"/*.json; do
  case "$f" in *predicted*|*metrics*) continue ;; esac
  python -m benchmarks table "$f" > "${f%.json}-table.md" 2>&1
  sed -n '/^Off their predicted bound/,$p' "${f%.json}-table.md"
done
timeout 90 python -m benchmarks metrics --device cuda --out "$out" > "$out/metrics.txt" 2>&1
echo "metrics exit $?"; tail -5 "$out/metrics.txt"
