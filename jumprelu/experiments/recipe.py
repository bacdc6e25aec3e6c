"""A JumpReLU SAE at a requested L0 with a named recipe, on your own activation store.

  jumprelu train --config recipe:l0=50 --workdir DIR \
      --config.data.source=/path/store --config.train.steps=2000 --config.sae.width=4096
  jumprelu train --config recipe:l0=50,long --workdir DIR ...     # for 8M tokens and more
  jumprelu train --config recipe:l0=50,paper --workdir DIR ...    # the paper's recipe instead
  jumprelu train --config recipe:l0=50,width=4096,matryoshka --workdir DIR ...   # Matryoshka JumpReLU

Hardware: any; run time is that of the step (jumprelu plan prints it for a TPU slice).

`l0=T` asks for a mean L0 of T (the target-L0 controller sets λ). The default recipe is "short",
the one measured best at budgets of millions of tokens (README "Recipes": the first 80% of the
steps as BatchTopK with k = T while θ trains in its shadow, then per-latent θ; raw θ, bandwidth
0.01, a pre-activation loss on dead latents, Gemma Scope 2's frequency penalty after the
hand-over (sparing the 0.5% most frequent latents), lr 4e-3 decaying over the last 20% except
θ's, weight decay 0.3 on W_enc, and the controller reading the L0 of 1,024 of the store's
held-out rows, so `data.eval_rows` must exceed 1,024, and the report reads the rest; afterwards
`jumprelu refit --workdir DIR` fits the decoder by least squares);
`long` is the short recipe with lr 5e-3 and the decay over the last 40%, measured better from
8M tokens on (README "Recipes": at 8M, FVU −0.1% / −0.1% / −1.2% at L0 20 / 50 / 100 on the
tuning split); the recipe cannot see the budget (`train.steps` is set after it), so say `long`.
`paper` keeps the paper's recipe (log θ, ε 0.001, lr 7e-5, 10,000-step λ warm-up), which is
tuned for billions of tokens. Without `l0`, λ is `sae.sparsity_coefficient` as usual (the
BatchTopK phase and the held-out rows wait for a target: `--config.sae.target_l0=T` is `l0=T`).
`matryoshka` nests prefixes of width/8, width/4, width/2 and width latents, their reconstruction
errors weighted 1:1:1:9 (README "Recipes": at 2M tokens, FVU +2.7% / +1.8% / +1.4% above the plain
recipe's at L0 20 / 50 / 100, +1.9% / +0.9% / −0.1% after both refits; the first eighth of the
latents reconstructing alone at FVU 0.25–0.34; earlier versions in
benchmarks/results/fidelity_history.md); give the width here
(`width=W`), since the prefixes are computed from it.
`runlocal` shrinks the run to a CPU smoke test (width 256, 20 steps; the Matryoshka prefixes follow).
"""

from jumprelu.config import base_config
from jumprelu.errors import ConfigError
from jumprelu.launch import experiment
from jumprelu.recipes import apply_recipe


def get_config(arg=None):
    args = experiment.parse_arg(arg, ("l0", "width", "paper", "long", "matryoshka"), "recipe")
    named = [name for name in ("paper", "long") if experiment.flag(args, name, "recipe")]
    if len(named) > 1:
        raise ConfigError("recipe argument names recipes paper and long; expected at most one")
    c = base_config()
    apply_recipe(c, named[0] if named else "short", experiment.number(args, "l0", None, "recipe"))
    c.sae.width = experiment.number(args, "width", c.sae.width, "recipe", int)
    if experiment.flag(args, "matryoshka", "recipe"):
        c.sae.matryoshka_weights = (1.0, 1.0, 1.0, 9.0)  # chosen on a seed-1 split (README "Recipes")
        _nest(c)
    return runlocal(c) if experiment.flag(args, "runlocal", "recipe") else c


def _nest(c):
    """The Matryoshka prefixes at width/8, /4, /2 and the whole width."""
    w = c.sae.width
    c.sae.matryoshka_widths = (w // 8, w // 4, w // 2, w)


def runlocal(c):
    """The smoke-test sizes; Matryoshka's prefixes recomputed at the shrunk width (a sweep shrinks
    after its overrides, so they are computed again here rather than kept from get_config)."""
    c = experiment.runlocal(c)
    if c.sae.get("matryoshka_widths"):
        _nest(c)
    return c
