"""The held-out evaluation at each checkpoint (the last one is the final evaluation's state):
the held-out rows are encoded and `eval/*` scalars and the histogram of log10 firing frequencies
(latents that never fired at -7) go to the metric writers (`log.firing_histogram`)."""

from __future__ import annotations

import numpy as np

from jumprelu.train.writers import Writers

HISTOGRAM_FLOOR = -7.0  # log10 firing frequency given to latents that never fired


def wants_histograms(log_cfg) -> bool:
    """Whether checkpoints encode the held-out rows (the same answer on every process)."""
    return bool(log_cfg.get("firing_histogram", True)) and bool(
        log_cfg.get("tensorboard", True) or log_cfg.get("wandb_project")
    )


def metrics(cfg, kind, state, eval_rows: np.ndarray) -> list[dict]:
    """evaluate_rows of each SAE of `state` (one, or K stacked) on the held-out rows.

    Collective on multi-host runs (the params are gathered): call it on every process.
    """
    from jumprelu.core.folded import fold
    from jumprelu.evaluate.metrics import evaluate_rows
    from jumprelu.train import distributed
    from jumprelu.train.state import member_of

    params, scale, stats = distributed.to_host((state.params, state.scale, state.stats))
    members = len(cfg.stack.sparsity_coefficients)
    out = []
    for i in range(members) if members else [None]:
        p, s = (params, stats) if i is None else (member_of(params, i), member_of(stats, i))
        folded = fold(kind.export(p, s), scale, cfg.sae.pre_encoder_bias)
        out.append(evaluate_rows({k: np.asarray(v) for k, v in folded.items()}, eval_rows))
    return out


def write(writers: list[Writers], step: int, per_sae: list[dict]) -> None:
    """eval/* scalars and the log10 firing-frequency histogram, one SAE per writer."""
    for w, m in zip(writers, per_sae, strict=False):
        freq = np.asarray(m["firing_frequency"])
        w.write_eval(step, {f"eval/{k}": float(m[k]) for k in ("l0", "fvu", "mse", "dead_fraction", "dense_fraction")})
        w.write_histogram(step, "eval/log10_firing_frequency", np.log10(np.maximum(freq, 10**HISTOGRAM_FLOOR)))
