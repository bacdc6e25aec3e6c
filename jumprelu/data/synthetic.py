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
import json
import os
import time

import numpy as np

from jumprelu.errors import DataError
from jumprelu.store import StoreWriter
from jumprelu.store import format as store_format
from jumprelu.store.lock import StoreBusy
from jumprelu.store.metadata import read_metadata


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


def generate_chunks(spec: SyntheticSpec, chunk_rows: int = 65536):
    """Yields (first row, rows [n, d_model] float32) covering all `spec.rows`, deterministic in spec.seed."""
    dirs = true_directions(spec)
    probs = firing_probabilities(spec).astype(np.float32)
    rng = np.random.default_rng([spec.seed, 1])
    mean = rng.standard_normal(spec.d_model)
    mean = (spec.mean_norm * mean / np.linalg.norm(mean)).astype(np.float32)
    for start in range(0, spec.rows, chunk_rows):
        n = min(chunk_rows, spec.rows - start)
        active = rng.random((n, spec.num_features), dtype=np.float32) < probs
        mags = rng.uniform(0.5, 1.5, (n, spec.num_features)).astype(np.float32)
        noise = rng.standard_normal((n, spec.d_model), dtype=np.float32)
        noise *= spec.noise_std / np.sqrt(spec.d_model)
        yield start, (active * mags) @ dirs + mean + noise


def generate(spec: SyntheticSpec) -> np.ndarray:
    """All `spec.rows` activations, [rows, d_model] float32."""
    return np.concatenate([rows for _, rows in generate_chunks(spec)])


def write_store(spec: SyntheticSpec, path: str, wait_s: float = 600.0) -> None:
    """Writes the spec's rows into a store at `path` through `StoreWriter` (resuming if interrupted).

    A complete store made from the same spec is reused; one from another spec is an error. While
    another process writes it (runs of one spec share a temporary store), waits up to wait_s for it.
    """
    description = "synthetic " + json.dumps(dataclasses.asdict(spec), sort_keys=True)
    meta_file = os.path.join(path, store_format.METADATA)
    deadline = time.monotonic() + wait_s
    while True:
        if os.path.exists(meta_file):
            found = read_metadata(path).get("text_source")  # damaged: one line naming the file
            if found != description:
                raise DataError(
                    f"store {path} holds synthetic data made from other data.synthetic settings "
                    f"({found}); use a new --workdir"
                )
            return
        try:
            writer = StoreWriter(
                path, d_model=spec.d_model, model="synthetic", site="synthetic", text_source=description
            )
            break
        except StoreBusy:  # runs of one spec share its store (gs:// workdirs): the writing one finishes it
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        except DataError:
            if not os.path.exists(meta_file):  # (completed between the check and the lock: reused above)
                raise
    done = writer.rows_written
    for start, rows in generate_chunks(spec):
        if start + len(rows) > done:
            writer.append(rows[max(0, done - start) :])
    writer.close()


def features_recovered(decoder_rows: np.ndarray, directions: np.ndarray, min_cosine: float = 0.9) -> float:
    """Share of true directions with some decoder row at cosine >= min_cosine.

    decoder_rows: [M, d] (any norms); directions: [F, d] unit rows.
    """
    w = decoder_rows / np.maximum(np.linalg.norm(decoder_rows, axis=1, keepdims=True), 1e-12)
    best = (directions @ w.T).max(axis=1)  # [F]
    return float(np.mean(best >= min_cosine))
