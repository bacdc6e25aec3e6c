"""Synthetic activations with known ground truth, the quickstart's embedded default.

Each row is a sparse non-negative combination of `num_features` random unit
directions in d_model dimensions, plus a shared offset and isotropic noise:

  x = μ + Σ_i a_i s_i u_i + n,   s_i ~ Bernoulli(p_i),  p_i ∝ (i+1)^-α,
  a_i ~ Uniform(0.5, 1.5),       n ~ N(0, σ² I / d)

The firing probabilities follow a power law (a few common features, a long tail of
rare ones), scaled so that on average `features_per_token` are active. Because the
true directions are known, training can report how many of them the SAE found.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    d_model: int = 128
    num_features: int = 256
    rows: int = 262144
    features_per_token: float = 6.0
    power_law_exponent: float = 1.0
    noise_std: float = 0.02
    mean_norm: float = 1.0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg) -> SyntheticSpec:
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


def true_directions(spec: SyntheticSpec) -> np.ndarray:
    """The ground-truth unit feature directions: [num_features, d_model] float32."""
    rng = np.random.default_rng([spec.seed, 0])
    u = rng.standard_normal((spec.num_features, spec.d_model))
    return (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)


def firing_probabilities(spec: SyntheticSpec) -> np.ndarray:
    """p_i ∝ (i+1)^-α with Σ p_i = features_per_token, capped at 1: [num_features]."""
    w = (np.arange(spec.num_features) + 1.0) ** -spec.power_law_exponent
    p = w * spec.features_per_token / w.sum()
    for _ in range(50):  # redistribute the excess of capped features to the others
        capped = p >= 1.0
        if not capped.any():
            break
        p = np.minimum(p, 1.0)
        free = ~capped
        p[free] *= (spec.features_per_token - capped.sum()) / p[free].sum()
    return np.minimum(p, 1.0)


def generate(spec: SyntheticSpec, chunk_rows: int = 65536) -> np.ndarray:
    """All `spec.rows` activations, [rows, d_model] float32, deterministic in spec.seed."""
    dirs = true_directions(spec)
    probs = firing_probabilities(spec).astype(np.float32)
    rng = np.random.default_rng([spec.seed, 1])
    mean = rng.standard_normal(spec.d_model)
    mean = (spec.mean_norm * mean / np.linalg.norm(mean)).astype(np.float32)
    out = np.empty((spec.rows, spec.d_model), np.float32)
    for start in range(0, spec.rows, chunk_rows):
        n = min(chunk_rows, spec.rows - start)
        active = rng.random((n, spec.num_features), dtype=np.float32) < probs
        mags = rng.uniform(0.5, 1.5, (n, spec.num_features)).astype(np.float32)
        noise = rng.standard_normal((n, spec.d_model), dtype=np.float32)
        noise *= spec.noise_std / np.sqrt(spec.d_model)
        out[start : start + n] = (active * mags) @ dirs + mean + noise
    return out


def features_recovered(decoder_rows: np.ndarray, directions: np.ndarray, min_cosine: float = 0.9) -> float:
    """Share of true directions with some decoder row at cosine >= min_cosine.

    decoder_rows: [M, d] (any norms); directions: [F, d] unit rows.
    """
    w = decoder_rows / np.maximum(np.linalg.norm(decoder_rows, axis=1, keepdims=True), 1e-12)
    best = (directions @ w.T).max(axis=1)  # [F]
    return float(np.mean(best >= min_cosine))
