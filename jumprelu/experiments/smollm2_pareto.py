"""The Pareto comparison on real activations: every SAE kind at width 4,096 on a small real model.

  jumprelu store convert ../shared/data/smollm2_135m_l15_resid_dev.npy stores/smollm2_l15
  jumprelu sweep smollm2_pareto --local              # all 23 runs, one after another
  python benchmarks/pareto.py --data ../shared/data/smollm2_135m_l15_resid_dev.npy --out /tmp/pareto

Hardware: any CPU. Expected run time on 2 cores: ~90 s per JumpReLU/ReLU/Gated run and ~150 s
per TopK/BatchTopK run (500 steps of 1,024 tokens at d_model 576, width 4,096; the planner's
matmul count is 24 GFLOP per step), ~45 min for the whole sweep.

Data: residual-stream activations of SmolLM2-135M after block 15 (d_model 576), 120,000 tokens
of English prose, converted to a store (first command). `data.source` points at the store.

Argument (EXPERIMENT:arg, comma-separated): a kind (jumprelu, relu, gated, topk, batchtopk)
restricts the sweep to that kind and sets it in get_config; `runlocal` shrinks to a smoke test.

Schedule: 512k tokens is 1/8,000 of the paper's budget, so the learning rate is higher (3e-3),
warm-ups are short (50 / 100 steps) and JumpReLU uses the raw-θ parameterisation (under Adam a
log θ moves by only ~lr·θ per step: from θ = 0.001 it would barely move in 500 steps). Every kind
gets the same data, schedule, width and evaluation; only its sparsity knob is swept.
"""

import os

from jumprelu.config import base_config
from jumprelu.launch import experiment

KINDS = ("jumprelu", "relu", "gated", "topk", "batchtopk")

# The sparsity knob of each kind and its values, spanning L0 of roughly 10 to 250 at this budget.
SWEEP = {
    "jumprelu": ("sae.sparsity_coefficient", [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
    "relu": ("sae.sparsity_coefficient", [0.01, 0.03, 0.1, 0.3, 1.0]),
    "gated": ("sae.sparsity_coefficient", [0.03, 0.1, 0.3, 1.0, 3.0]),
    "topk": ("sae.k", [16, 32, 64, 128]),
    "batchtopk": ("sae.k", [16, 32, 64, 128]),
}


def _kind(args: dict) -> str | None:
    chosen = [k for k in KINDS if args.get(k)]
    return chosen[0] if chosen else None


def get_config(arg=None):
    args = experiment.parse_arg(arg)
    c = base_config()
    c.data.source = "stores/smollm2_l15"
    c.data.eval_rows = 8192
    c.sae.kind = _kind(args) or "jumprelu"
    c.sae.width = 4096
    c.sae.threshold_param = "raw"
    c.train.steps = 500
    c.train.batch_size = 1024
    c.train.lr = 3e-3
    c.train.lr_warmup_steps = 50
    c.train.sparsity_warmup_steps = 100
    c.ckpt.every_steps = 250
    c.log.every_steps = 50
    return runlocal(c) if args.get("runlocal") else c


def runlocal(c):
    """A smoke test on the store if it exists here, else on synthetic data."""
    return experiment.runlocal(c, keep_data=os.path.isdir(c.data.source))


def get_sweep(arg=None):
    args = experiment.parse_arg(arg)
    kinds = [_kind(args)] if _kind(args) else KINDS
    runs = []
    for kind in kinds:
        field, values = SWEEP[kind]
        runs += [{"sae.kind": kind, field: v} for v in values]
    return runs
