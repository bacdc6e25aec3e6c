"""Named JumpReLU recipes: overrides of the base config (`jumprelu.config.base_config`).

"paper" is the base config itself (Rajamanoharan et al. / Gemma Scope, tuned for billions of
tokens); "short" is the recipe measured best at budgets of millions of tokens (README
"Recipes"), reached by asking for a target L0 (`--config recipe:l0=T`); "long" is "short" with a
higher lr and a longer final decay, measured better from 8M tokens on (`recipe:l0=T,long`). All
are budget-free: schedules are fractions of `train.steps`, so the caller, who knows the budget,
picks the recipe (`smollm2_pareto` does from its `tokens`).
"""

from __future__ import annotations

import ml_collections

from jumprelu.config import set_fields
from jumprelu.errors import ConfigError

RECIPES = {
    "paper": {},
    "short": {
        "sae.threshold_param": "raw",  # a log θ moves by only ~lr·θ per Adam step
        "sae.bandwidth": 0.01,
        "sae.target_l0_rate": 0.03,
        "sae.pre_act_coefficient": 1e-3,
        "sae.dead_window_tokens": 50_000,
        # seed-1 split, 2M tokens: lr 4e-3 beat 3e-3 at L0 20/50/100 (FVU −1.6%/−1.2%/−2.0%); 5e-3 left
        # 4.9% of the latents dead at L0 20
        "train.lr": 4e-3,
        "train.lr_warmup_steps": 50,
        "train.lr_decay_fraction": 0.2,
        "train.sparsity_warmup_steps": 0,  # the target-L0 controller replaces the λ warm-up
        "train.encoder_weight_decay": 0.3,  # runs that revisit their rows over-fit the encoder
        "sae.batchtopk_fraction": 0.8,  # BatchTopK (k = target) trains faster; θ per latent for the rest
        # a silent latent's first Adam step (β1 0) is up to 32·lr: in the BatchTopK phase at k 100 that
        # collapsed the SAE (batch FVU 0.14 → 1.05 in 50 steps)
        "train.adam_update_clip": 3.0,
        # Gemma Scope 2's penalty on latents firing on more than 10% of tokens, from the hand-over on
        # (see the kind); θ keeps its lr through the final decay, so the controller can make up for
        # the L0 it removes (without: target 20 ended at L0 22.6, +13%)
        "sae.frequency_penalty": 0.01,
        # ...sparing the batch's 0.5% most frequent latents (the goal allows 1% above 10%): taking every
        # dense latent down to 10% cost 2.7% FVU at target 100 (seed 1, 2M tokens: 0.1060 → 0.1040 with it)
        "sae.frequency_allowance": 0.005,
        "train.decay_thresholds": False,
        # the controller reads the L0 of 1,024 of the store's held-out rows, not only the batch's: a run
        # that revisits its rows fits θ to them (seed-1 window split, target 20: unseen text at L0
        # +8.4% → +5.7%)
        "sae.target_l0_held_out_rows": 1024,
    },
}
# seed-1 split, 8M tokens, targets 20/50/100: lr 5e-3 with its decay over the last 40% (θ's lr
# excepted, as in "short") gave FVU −0.1%/−0.1%/−1.2% against "short" (ties at 20 and 50, with
# fewer dead latents); lr 5e-3 alone overshot the L0 at 2M (+4% at target 100) and left 4.9% of
# the latents dead at target 20, so "short" keeps 4e-3
RECIPES["long"] = {**RECIPES["short"], "train.lr": 5e-3, "train.lr_decay_fraction": 0.4}
# the smallest budget "long" was measured better at (README "Recipes"); below it, "short": at 2M
# (seed 1, both recipes side by side) "long" tied (FVU +0.2% at target 100, −0.1% at 20) but left
# 4.1% of the latents dead at target 20 against 1.7%; at 4M, target 20, it lost (FVU +0.4%, 2.5%
# dead against 1.6%); 4M-8M is unmeasured
LONG_RECIPE_TOKENS = 8_000_000


def recipe_for_tokens(tokens: int) -> str:
    """The JumpReLU recipe measured best at a budget of `tokens` training tokens."""
    return "long" if tokens >= LONG_RECIPE_TOKENS else "short"


def apply_recipe(c: ml_collections.ConfigDict, name: str, target_l0: float | None = None):
    """Sets recipe `name`'s fields on c (in place; returns c), and the target L0 when given."""
    if name not in RECIPES:
        raise ConfigError(f"recipe must be one of {tuple(RECIPES)}, found {name!r}")
    set_fields(c, RECIPES[name])
    if target_l0 is not None:
        c.sae.target_l0 = float(target_l0)
    # without a target the BatchTopK phase and the held-out rows stay set but do nothing (both are
    # the controller's): a later `--config.sae.target_l0=T` then gets the whole recipe
    return c
