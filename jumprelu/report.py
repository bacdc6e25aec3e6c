"""The end-of-run report: held-out metrics, recovered features, where things are."""

from __future__ import annotations

import json
import os

import numpy as np

from jumprelu import data as data_lib
from jumprelu import distributed, kinds
from jumprelu.checkpoint import checkpoint_dir
from jumprelu.data import synthetic
from jumprelu.evaluate import evaluate_rows
from jumprelu.fold import fold
from jumprelu.metrics_log import atomic_write_text, read_metrics
from jumprelu.plots import plot_training_curves


def final_report(cfg, workdir: str, state, stream, start_step: int) -> dict:
    params, scale, stats = distributed.to_host((state.params, state.scale, state.stats))
    kind = kinds.from_config(cfg.sae, cfg.data.d_model)
    folded = fold(kind.export(params, stats), scale, cfg.sae.pre_encoder_bias)
    folded = {k: np.asarray(v) for k, v in folded.items()}
    eval_rows = stream.eval_set()
    metrics = evaluate_rows(folded, eval_rows) if len(eval_rows) else {}
    metrics.pop("firing_frequency", None)
    steps = int(state.step)
    out = {
        "steps": steps,
        "tokens": steps * cfg.train.batch_size,
        "resumed_from_step": start_step,
        "scale": float(scale),
        "eval": metrics,
        "checkpoint": os.path.join(checkpoint_dir(workdir), str(steps)),
        "workdir": os.path.abspath(workdir),
    }
    truth = data_lib.ground_truth(cfg.data)
    if truth is not None:
        out["features_recovered"] = synthetic.features_recovered(params["W_dec"], truth)
        out["true_features"] = int(truth.shape[0])
    if not distributed.is_lead():  # every process evaluates; only the lead writes
        return out
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    if records:
        curves = os.path.join(workdir, "training_curves.png")
        plot_training_curves(records, curves, title=f"{cfg.data.source}  width {cfg.sae.width}")
        out["curves"] = curves
    atomic_write_text(os.path.join(workdir, "report.json"), json.dumps(out, indent=2))
    return out


def format_report(r: dict) -> str:
    lines = [f"jumprelu: {r['steps']:,} steps, {r['tokens']:,} tokens (input scale C = {r['scale']:.4g})"]
    e = r.get("eval")
    if e:
        lines.append(
            f"  held-out ({e['tokens']:,} tokens): L0 {e['l0']:.2f}   FVU {e['fvu']:.4f}   "
            f"dead latents {100 * e['dead_fraction']:.1f}%   firing on >10% of tokens {100 * e['dense_fraction']:.1f}%"
        )
    if "features_recovered" in r:
        n = r["true_features"]
        k = round(r["features_recovered"] * n)
        lines.append(
            f"  true features recovered (decoder row at cosine >= 0.9): {k}/{n} = {100 * r['features_recovered']:.1f}%"
        )
    lines.append(f"  checkpoint: {r['checkpoint']}")
    lines.append(f"  load it:    import jumprelu; sae = jumprelu.load({r['workdir']!r})")
    if "curves" in r:
        lines.append(f"  curves:     {r['curves']}")
    lines.append(f"  report:     {os.path.join(r['workdir'], 'report.json')}")
    return "\n".join(lines)
