#!/usr/bin/env bash
# Issue 19 §5: the CUDA checks in one run (<= 8 minutes on one H200). Run from anywhere:
#   bash benchmarks/gpu_check.sh            # exit 1 if a target is missed, 2 if a step failed to run
# Prints: overhead ratios on CUDA (fp32 and bf16 autocast, batch 256, resnet50 and vit_base_patch16_224,
# random init), collect throughput vs a plain timm-validate-style loop (target >= 0.95x), bf16 vs fp32
# statistics on the shared COCO images, channels_last on vs off; then a summary block.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
if ! "$PY" -c "import patchcsra" 2>/dev/null; then
  "$PY" -m pip install -q -e '.[test]' -c constraints.txt
fi
"$PY" - <<'PYEOF'
import torch, timm
print(f"torch {torch.__version__}, timm {timm.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
PYEOF
LOG=$(mktemp -d)
declare -A RESULT
step() {  # step NAME COMMAND...: run, tee into the log, record ok / MISSED (exit 1) / FAILED (other)
  local name=$1; shift
  echo; echo "=== $name"
  local rc=0
  timeout "${STEP_TIMEOUT:-90}" "$@" 2>&1 | tee "$LOG/$name.txt" || rc=${PIPESTATUS[0]}
  case $rc in 0) RESULT[$name]=ok ;; 1) RESULT[$name]=MISSED ;; *) RESULT[$name]="FAILED (rc $rc)" ;; esac
}
MODELS=resnet50@224,vit_base_patch16_224@224
step overhead_fp32 "$PY" benchmarks/overhead.py --device "$DEVICE" --models "$MODELS" --batches 256 --pairs 15 \
  --num-classes 1000 --json "$LOG/overhead_fp32.json"
step overhead_bf16 "$PY" benchmarks/overhead.py --device "$DEVICE" --amp bf16 --channels-last --models "$MODELS" \
  --batches 256 --pairs 15 --num-classes 1000 --json "$LOG/overhead_bf16.json"
step collect_throughput "$PY" benchmarks/collect_throughput.py --device "$DEVICE" --model resnet50 --amp bf16 \
  --channels-last --images 4096 --src-size 256 --img-size 224 --batch-size 256 --workers 8 --repeats 2
step bf16_agreement "$PY" benchmarks/collect_throughput.py --mode agreement --device "$DEVICE" --model resnet50 \
  --batch-size 64 --workers 4
step channels_last "$PY" benchmarks/collect_throughput.py --mode channels-last --device "$DEVICE" --model resnet50 \
  --amp bf16 --images 2048 --batch-size 256 --workers 8 --repeats 2

echo; echo "=== summary"
grep -h "ratio\|MISSED" "$LOG/overhead_fp32.txt" "$LOG/overhead_bf16.txt" | grep -v "^model" || true
grep -h "ratio " "$LOG/collect_throughput.txt" || true
grep -h "max|bf16" "$LOG/bf16_agreement.txt" || true
grep -h "on/off" "$LOG/channels_last.txt" || true
status=0
for name in overhead_fp32 overhead_bf16 collect_throughput bf16_agreement channels_last; do
  r=${RESULT[$name]:-"not run"}
  printf '%-20s %s\n' "$name" "$r"
  case $r in ok) ;; MISSED) [ $status -eq 0 ] && status=1 ;; *) status=2 ;; esac
done
echo "gpu_check: $([ $status -eq 0 ] && echo 'all targets met' || echo "exit $status")"
exit $status
