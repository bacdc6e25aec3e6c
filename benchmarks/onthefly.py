"""On-the-fly training against harvest-then-train on the tiny Gemma 2, same tokens; prints one JSON line.

  python benchmarks/onthefly.py [--world DIR] [--steps 200] [--batch 128] [--width 128]

Path "store": `harvest` writes steps × batch + eval_rows rows to a store, then `train` reads
them. Path "onthefly": `train` with data.source "lm" computes the same number of rows through
the LM as it trains. Both in this process, wall clock from the call to the report (model load
and compiles included, as a user sees them). Also printed: what K SAEs trained on the same
activations cost each way at these measured times (store: harvest once + K trainings;
on-the-fly: K trainings), and the FLOP arithmetic per token at Gemma 2 9B scale
(README, "On-the-fly training").
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import ml_collections
import numpy as np


def _flops_9b(layer: int = 20, d_model: int = 3584, widths=(1 << 14, 1 << 17, 1 << 20)) -> dict:
    """Per-token FLOPs: the 9B forward up to `layer` (2 · 9e9 · (L+1)/42, as the harvest config
    estimates it) against one SAE training step (forward 2·d·M encode + 2·M·d decode, backward
    twice that: 12·d·M), and the bytes a bfloat16 store holds per token."""
    lm = 2 * 9e9 * (layer + 1) / 42
    sae = {str(m): 12 * d_model * m for m in widths}
    return {
        "lm_forward_flops_per_token": lm,
        "sae_step_flops_per_token": sae,
        "lm_over_sae": {m: lm / f for m, f in sae.items()},
        "store_bytes_per_token_bf16": 2 * d_model,
        "store_tb_for_8b_tokens": 8e9 * 2 * d_model / 1e12,
    }


def _steady_tokens_per_s(workdir: str) -> float:
    """The median training rate over the log steps after the first (compiles and start-up excluded)."""
    from jumprelu.train.metrics_log import read_metrics

    rates = [r["tokens_per_s"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))[1:]]
    return float(np.median(rates)) if rates else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", help="a tiny world (jumprelu harvest.tiny DIR); default: made in a temp dir")
    p.add_argument("--out", help="where the store and runs go; default: a temp dir")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    args = p.parse_args()

    from jumprelu.experiments.harvest.gemma2 import get_config as harvest_config
    from jumprelu.experiments.onthefly import get_config as onthefly_config
    from jumprelu.harvest import onthefly, tiny
    from jumprelu.harvest.run import harvest
    from jumprelu.train import loop

    out = args.out or tempfile.mkdtemp(prefix="jumprelu_onthefly_")
    world = args.world or os.path.join(out, "world")
    if not os.path.exists(os.path.join(world, "ckpt")):
        tiny.make(world)
    tokens = args.steps * args.batch

    def train_cfg(source: str):
        c = onthefly_config(f"tiny={world}")
        c.sae.width = args.width
        c.train.update(steps=args.steps, batch_size=args.batch)
        c.ckpt.every_steps = args.steps
        c.log.update(every_steps=25, progress=False)
        c.data.source = source
        return ml_collections.ConfigDict(c.to_dict())

    # Store path: harvest exactly the rows training reads (plus the held-out ones), then train.
    h = harvest_config(f"tiny={world}")
    eval_rows = train_cfg("lm").data.eval_rows
    passes = 1 + tokens // 8000  # the tiny texts give ~9,000 rows a pass: repeat them as needed
    h.texts, h.progress = tuple(h.texts) * passes, False
    h.shard_rows = None  # the writer's default shard size (the tiny config's 256 rows is for tests)
    h.store, h.max_tokens = os.path.join(out, "store"), tokens + eval_rows
    t0 = time.perf_counter()
    harvested = harvest(h)
    harvest_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store_report = loop.train(train_cfg(h.store), os.path.join(out, "run_store"))
    store_train_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    otf_report = onthefly.train(train_cfg("lm"), os.path.join(out, "run_onthefly"))
    otf_s = time.perf_counter() - t0

    store_s = harvest_s + store_train_s
    sweep = {k: {"store_s": harvest_s + k * store_train_s, "onthefly_s": k * otf_s} for k in (1, 2, 4, 8)}
    result = {
        "benchmark": "onthefly",
        "tokens": tokens,
        "width": args.width,
        "harvest_s": harvest_s,
        "harvest_model_tokens_per_s": harvested["tokens_per_s"],
        "store_train_s": store_train_s,
        "store_total_s": store_s,
        "store_tokens_per_s": tokens / store_s,
        "onthefly_s": otf_s,
        "onthefly_tokens_per_s": tokens / otf_s,
        "onthefly_over_store_speed": store_s / otf_s,
        # Rates between log steps, start-up excluded: the store run reads a warm page cache.
        "steady_tokens_per_s": {
            "store_train": _steady_tokens_per_s(os.path.join(out, "run_store")),
            "onthefly_train": _steady_tokens_per_s(os.path.join(out, "run_onthefly")),
        },
        "fvu": {"store": store_report["eval"]["fvu"], "onthefly": otf_report["eval"]["fvu"]},
        "k_saes_same_activations": sweep,
        "gemma2_9b_layer20": _flops_9b(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
