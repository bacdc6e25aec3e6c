"""The Pareto comparison on real activations: every SAE kind at width 4,096 on a small real model.

  jumprelu store convert ../shared/data/smollm2_135m_l15_resid_dev.npy stores/smollm2_l15
  jumprelu sweep smollm2_pareto --local              # all 22 runs (23 with :paper), one after another
  python benchmarks/pareto.py --data ../shared/data/smollm2_135m_l15_resid_dev.npy --out /tmp/pareto

Hardware: any CPU. Expected run time on 2 cores: ~90 s per ReLU/Gated run, ~150 s per
TopK/BatchTopK run and ~1.5 × 90 s per JumpReLU run (its BatchTopK phase counts z > t up to
32 times a step, 17–25 on real data; at 2M tokens 554 s against 370 s without it) (500 steps of
1,024 tokens at d_model 576, width 4,096; the planner's matmul count is 24 GFLOP per step),
~50 min for the whole sweep.

Data: residual-stream activations of SmolLM2-135M after block 15 (d_model 576), 120,000 tokens
of English prose, converted to a store (first command). `data.source` points at the store.

Argument (EXPERIMENT:arg, comma-separated): a kind (jumprelu, relu, gated, topk, batchtopk)
restricts the sweep to that kind and sets it in get_config; `target_l0=T` asks JumpReLU for L0 T;
`tokens=N` sets the budget (default 512k: 500 steps of 1,024); `paper` trains JumpReLU with the
paper's loss and λ sweep instead of the recipe; `runlocal` shrinks to a smoke test.

Schedule: 512k tokens is 1/8,000 of the paper's budget, so every baseline kind trains at lr 3e-3
with a 50-step warm-up (ReLU and Gated with a 100-step λ warm-up); JumpReLU at the recipe's 4e-3
(5e-3 decaying over the last 40% from `tokens=8000000` on: the "long" recipe). JumpReLU
is the recommended short-budget recipe (`jumprelu.recipes.RECIPES["short"]`, README "Recipes": a BatchTopK phase
with k = target over the first 80% of the steps handing over to per-latent θ trained in its
shadow, raw θ, ε 0.01, a target L0 reached by the λ controller reading 1,024 held-out rows
besides the batch (data.eval_rows 8,192: the report measures the other 7,168), a pre-activation loss on dead
latents, a frequency penalty after the hand-over sparing the 0.5% most frequent latents, lr
decaying over the last 20% except θ's, decoupled weight decay 0.3 on W_enc), swept over its
target L0 as TopK is over k. Every kind gets the same data, token budget, width and evaluation.
"""

import os

from jumprelu.config import base_config
from jumprelu.errors import ConfigError
from jumprelu.launch import experiment
from jumprelu.recipes import apply_recipe, recipe_for_tokens

KINDS = ("jumprelu", "relu", "gated", "topk", "batchtopk")

# The sparsity knob of each kind and its values, spanning L0 of roughly 10 to 250 at this budget.
SWEEP = {
    "jumprelu": ("sae.target_l0", [16.0, 32.0, 64.0, 128.0]),
    "jumprelu_paper": ("sae.sparsity_coefficient", [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
    "relu": ("sae.sparsity_coefficient", [0.01, 0.03, 0.1, 0.3, 1.0]),
    "gated": ("sae.sparsity_coefficient", [0.03, 0.1, 0.3, 1.0, 3.0]),
    "topk": ("sae.k", [16, 32, 64, 128]),
    "batchtopk": ("sae.k", [16, 32, 64, 128]),
}


def _kind(args: dict) -> str | None:
    chosen = [k for k in KINDS if experiment.flag(args, k, "smollm2_pareto")]
    if len(chosen) > 1:  # the first was taken and the others dropped without a word
        raise ConfigError(f"smollm2_pareto argument names kinds {', '.join(chosen)}; expected at most one")
    return chosen[0] if chosen else None


ARGS = (*KINDS, "tokens", "target_l0", "paper")


def get_config(arg=None):
    args = experiment.parse_arg(arg, ARGS, "smollm2_pareto")
    c = base_config()
    c.data.source = "stores/smollm2_l15"
    c.data.eval_rows = 8192
    c.sae.kind = _kind(args) or "jumprelu"
    c.sae.width = 4096
    c.sae.threshold_param = "raw"
    c.train.batch_size = 1024
    tokens = experiment.number(args, "tokens", 512_000, "smollm2_pareto", int)
    if tokens < c.train.batch_size:  # 0 steps, which validate() would blame on train.steps
        raise ConfigError(
            f"smollm2_pareto argument tokens must be at least one batch of {c.train.batch_size}, found {tokens}"
        )
    c.train.steps = tokens // c.train.batch_size
    c.train.lr = 3e-3
    c.train.lr_warmup_steps = 50
    c.train.sparsity_warmup_steps = 100
    if c.sae.kind == "jumprelu" and not experiment.flag(args, "paper", "smollm2_pareto"):
        target = experiment.number(args, "target_l0", 32.0, "smollm2_pareto")
        apply_recipe(c, recipe_for_tokens(tokens), target)
    c.ckpt.every_steps = 250
    c.log.every_steps = 50
    return runlocal(c) if experiment.flag(args, "runlocal", "smollm2_pareto") else c


def kind_config(arg, kind):
    """A baseline's run in the sweep over every kind: as `smollm2_pareto:KIND` configures it (its
    own λ warm-up, no weight decay or update clip), not the JumpReLU recipe's base."""
    return get_config(",".join(part for part in (arg, kind) if part))


def runlocal(c):
    """A smoke test on the store if it exists here, else on synthetic data."""
    return experiment.runlocal(c, keep_data=os.path.isdir(c.data.source))


def get_sweep(arg=None):
    args = experiment.parse_arg(arg, ARGS, "smollm2_pareto")
    chosen = _kind(args)
    paper = experiment.flag(args, "paper", "smollm2_pareto")
    if "target_l0" in args:  # the sweep sets every run's target (SWEEP) and would ignore this one
        one_run = "`jumprelu train --config smollm2_pareto:jumprelu,target_l0=T` trains that one target"
        raise ConfigError(f"smollm2_pareto argument target_l0 is the single run's, not the sweep's; {one_run}")
    runs = []
    for kind in [chosen] if chosen else KINDS:
        field, values = SWEEP["jumprelu_paper" if kind == "jumprelu" and paper else kind]
        runs += [{"sae.kind": kind, field: v} for v in values]
    return runs
