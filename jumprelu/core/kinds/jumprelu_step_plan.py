"""Which step the JumpReLU kind trains with: the sparse one (`core/sparse.py`: one dense product
plus O(B·L0·d)) or the dense one, from its `sae.*` fields and the backend (`sparse_plan`,
deterministic per config and backend), and the share of the run trained as BatchTopK
(`batchtopk_phase`), whose steps are always dense.
"""

from __future__ import annotations

from jumprelu.core import backend as backends
from jumprelu.core import sparse

# `auto` takes the sparse step where it was measured faster (benchmarks/step.py --l0, README "Step
# speed", 2026-12-02): on XLA:CPU, from 4K latents with at most 1/8 of the latents kept per row.
# At 4K, batch 1,024, the sparse step was 2.18× the dense one at L0 20 (160 slots per row, 1/26
# of the latents), 1.26× at L0 50 (400, 1/10) and 0.91× at L0 100 (800, 1/5); at 16K, batch
# 4,096, 2.11× at L0 200 (1,600, 1/10) and ~3× at L0 50. Narrower SAEs were not measured.
_AUTO_MIN_WIDTH = 4096
_AUTO_MAX_KEPT_SHARE = 1 / 8
# On an NVIDIA H200 (benchmarks/step_accelerator.sh, 2026-12-04; batch 4,096, L0 50) the sparse
# step lost at the default precision, where the dense step's products run in TF32: 0.44× the dense
# step's speed at 16K, 0.82× at 64K, 1.01× at 131K (bfloat16: 0.40×, 1.01×). With float32 products
# (sae.matmul_precision=highest) it won: 1.21× at 16K, 2.32× at 131K, keeping 1/41 and 1/64 of the
# latents per row; more kept entries were not measured there. TPUs are not measured.
_AUTO_MIN_WIDTH_GPU = 16384
_AUTO_MAX_KEPT_SHARE_GPU = 1 / 32


def sparse_plan(s) -> tuple[int, str]:
    """(entries kept per row by the sparse step, or 0 for the dense step; why) from `sae.*`.

    Deterministic: the same config on the same backend always gives the same plan."""
    mode = s.get("sparse", "off")
    if mode == "off":
        return 0, "sae.sparse=off"
    unsupported = [
        name
        for name, on in (
            ("sae.sparsity_loss=tanh", s.get("sparsity_loss", "step") == "tanh"),
            ("sae.matryoshka_widths", bool(s.get("matryoshka_widths"))),
            ("sae.ste_pre_activations", bool(s.get("ste_pre_activations"))),
        )
        if on
    ]
    capacity = s.get("sparse_capacity", 0) or (
        sparse.default_capacity(s.target_l0, s.width) if s.get("target_l0") else 0
    )
    phase = " after the BatchTopK phase (dense)" if batchtopk_phase(s) else ""
    if mode == "on":
        return capacity, f"sae.sparse=on{phase}"
    if unsupported:
        return 0, f"auto: dense ({', '.join(unsupported)} needs f for every latent)"
    if not capacity:
        return 0, "auto: dense (no sae.target_l0 or sae.sparse_capacity to size the sparse step)"
    backend = backends.target()
    if backend == "gpu":
        precision = s.get("matmul_precision", "default")
        if s.get("compute_dtype", "float32") != "float32" or precision != "highest":
            why = "sae.compute_dtype=float32 with sae.matmul_precision=highest"
            return 0, f"auto: dense (on gpu the sparse step was measured faster only with {why})"
        min_width, max_share = _AUTO_MIN_WIDTH_GPU, _AUTO_MAX_KEPT_SHARE_GPU
    elif backend == "cpu":
        min_width, max_share = _AUTO_MIN_WIDTH, _AUTO_MAX_KEPT_SHARE
    else:
        return 0, f"auto: dense (the sparse step is not yet measured on {backend})"
    if s.width < min_width:
        return 0, f"auto: dense (width {s.width} < {min_width}, where the sparse step was not measured faster)"
    if capacity > max_share * s.width:
        return 0, f"auto: dense (capacity {capacity} > width/{round(1 / max_share)})"
    return capacity, f"auto: sparse, {capacity} entries per row{phase}"


def batchtopk_phase(s) -> float:
    """The share of the steps trained as BatchTopK: sae.batchtopk_fraction when there is a target
    L0 (its k), else 0."""
    return float(s.get("batchtopk_fraction") or 0.0) if s.get("target_l0") is not None else 0.0
