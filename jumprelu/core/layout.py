"""The one declaration of how SAE arrays lie on a ('data', 'model') device mesh.

Parameters are split Megatron-style along the dictionary dimension M over 'model' (W_enc
columns, W_dec rows, every per-latent vector), so the only cross-device reduction a step
needs is the partial reconstruction sum [B, d_model]. Batches are split over 'data'.
Training (`jumprelu.train.sharding`) and the spliced LM evaluation (`jumprelu.harvest.lm_eval`)
both take their specs from here; each SAE kind declares the specs of its own extra arrays
(`jumprelu.core.kinds`), and a name declared nowhere is an error, never silently replicated.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

AXES = ("data", "model")
DATA, MODEL = AXES

# The arrays every kind has (also the folded SAE's, with `threshold`).
SHARED_SPECS = {
    "W_enc": P(None, MODEL),  # [d_model, M]
    "b_enc": P(MODEL),  # [M]
    "W_dec": P(MODEL, None),  # [M, d_model]
    "b_dec": P(),  # [d_model]
}
THRESHOLD_SPEC = P(MODEL)  # [M]: θ, also of folded SAEs of every kind
BATCH_SPEC = P(DATA, None)  # activations [B, d_model]
REPLICATED = P()

# The folded SAE (`core.folded.FOLDED_KEYS` order) as the LM evaluation splices it in.
FOLDED_SPECS = {**SHARED_SPECS, "threshold": THRESHOLD_SPEC}
