#!/usr/bin/env bash
# Peer-benchmark environment: SAELens (PyTorch, CPU build) in its own venv.
# Never a dependency of the jumprelu project itself.
#
# Usage: bash benchmarks/peers/setup.sh        (idempotent; rerun = no-op)
#        FORCE=1 bash benchmarks/peers/setup.sh (reinstall)
#
# Torch choice: PyPI's default Linux x86_64 torch wheel is a CUDA build that pulls
# ~15 nvidia-* / cuda-* wheels (several GB).  This machine image ships a CPU build
# (torch 2.13.0+cpu, found by pip through its find-links), so we ask for exactly
# that and pin it in constraints.txt; sae-lens is then installed under that
# constraint so it cannot drag in a CUDA torch.  If that wheel is not available
# (other image / aarch64), set TORCH_SPEC (e.g. TORCH_SPEC='torch==2.9.1' on
# aarch64, which is a CPU build there), otherwise we fall back to PyPI's default.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
SAE_LENS_SPEC="${SAE_LENS_SPEC:-sae-lens>=6.54,<7}"
STAMP="$VENV/.peers-installed"
CONS="$HERE/.venv/constraints.txt"

if [[ -f "$STAMP" && -z "${FORCE:-}" ]] && "$VENV/bin/python" -c "import sae_lens, torch, safetensors, numpy, sae_bench" 2>/dev/null; then
  echo "peers venv already installed: $(cat "$STAMP")"
  exit 0
fi

t0=$(date +%s)
[[ -n "${FORCE:-}" ]] && rm -rf "$VENV"  # a reinstall from nothing: pip would keep a broken venv's packages
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# 1) CPU torch first.
if [[ -n "${TORCH_SPEC:-}" ]]; then
  "${PIP[@]}" install "$TORCH_SPEC"
elif ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if ! "${PIP[@]}" install "torch==2.13.0+cpu"; then
    echo "WARNING: no CPU torch wheel found; falling back to PyPI's default torch (CUDA build, large)" >&2
    "${PIP[@]}" install torch
  fi
fi
TV="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
echo "torch==$TV" > "$CONS"

# 2) sae-lens etc. under the torch pin (the global pip constraint, if any, still applies too).
"${PIP[@]}" install -c "$CONS" "$SAE_LENS_SPEC" safetensors numpy

# 3) SAEBench, for tests/test_saelens_interop.py's check that its loader accepts our export.
#    --no-deps: sae-bench 0.6.0 declares numpy<2 (the loader helpers it runs work with numpy 2)
#    and its full evals' dependencies (datasets, openai, sae-probes...) are not needed here.
"${PIP[@]}" install --no-deps "${SAE_BENCH_SPEC:-sae-bench==0.6.0}"

if "$VENV/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "NOTE: nvidia-* packages present in the venv (CUDA torch)" >&2
fi
VER="$("$VENV/bin/python" -c 'import importlib.metadata as m; print("sae-lens", m.version("sae-lens"), "sae-bench", m.version("sae-bench"), "torch", m.version("torch"))')"
echo "$VER" > "$STAMP"
t1=$(date +%s)
echo "installed: $VER in $((t1 - t0)) s; venv size: $(du -sh "$VENV" | cut -f1)"
