#!/usr/bin/env bash
# The step benchmark's accelerator suite (README "Step speed"): dense and sparse JumpReLU steps at
# 16K, 64K and 131K latents (batch 4,096, target L0 50) in float32 at the backend's default precision
# (TF32 products on NVIDIA GPUs) and at "highest" (float32 products), in bfloat16, and TopK's sparse
# decoder, one JSON line per run of benchmarks/step.py appended to OUT. Unchanged on GPU, TPU or CPU
# (on CPU the 64K and 131K runs outlast the default STEP_TIMEOUT: raise it to hours); each line names
# the device and its MFU where the chip's peak is known.
#
#   bash benchmarks/step_accelerator.sh ../shared/data/smollm2_135m_l15_resid_dev.npy step_gpu.jsonl
#
# A run that fails or outlasts STEP_TIMEOUT seconds (default 300) is reported on stderr and the
# suite goes on, so one bad shape never costs the others. PYTHON picks the interpreter.
set -u
usage="usage: bash benchmarks/step_accelerator.sh DATA.npy OUT.jsonl"
data=${1:?$usage}
out=${2:?$usage}
[ -f "$data" ] || { echo "step_accelerator.sh: no activations file $data" >&2; exit 2; }
python=${PYTHON:-python}
step="$(dirname "$0")/step.py"
failed=0

run() {
    echo "+ benchmarks/step.py --data $data --batch 4096 $*" >&2
    if ! timeout "${STEP_TIMEOUT:-300}" "$python" "$step" --data "$data" --batch 4096 "$@" >>"$out"; then
        echo "step_accelerator.sh: failed or timed out: $*" >&2
        failed=$((failed + 1))
    fi
}

run --width 16384 --l0 50
run --width 131072 --l0 50
run --width 16384 --l0 50 --dtype bfloat16
run --width 131072 --l0 50 --dtype bfloat16
run --width 65536 --l0 50
run --width 16384 --l0 50 --kind topk
run --width 16384 --l0 50 --matmul-precision highest
run --width 131072 --l0 50 --matmul-precision highest
echo "step_accelerator.sh: $failed run(s) failed; results in $out" >&2
exit $((failed > 0))
