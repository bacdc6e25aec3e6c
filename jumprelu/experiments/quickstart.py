"""Quickstart: a JumpReLU SAE on synthetic activations with known ground truth.

  jumprelu train --config quickstart --workdir /tmp/jumprelu_quickstart
  jumprelu sweep quickstart --local            # its λ sweep: 4 runs, one after another
  jumprelu sweep quickstart:stacked --local    # the same 4 λ as 4 stacked SAEs in one run
  jumprelu train --config quickstart:stacked --workdir DIR   # that one stacked run, directly

Hardware: any CPU (2 cores are enough). Expected run time on 2 cores: ~40 s for one run,
~2 min for the sweep (123 s measured), ~3 min for the stacked sweep (182 s: at this toy size
a stacked step costs 1.6× four single steps, see README "Stacked SAEs").

The data are sparse non-negative combinations of 256 random unit directions in 128
dimensions (power-law firing frequencies, plus noise), so the report can say how many
true features the SAE recovered. A toy problem trains in minutes only with a shorter
schedule than the paper's 4B-token runs: the learning rate, its warm-up and the λ
warm-up are shortened here and the threshold starts nearer its final value. Every
other setting is the paper's (see jumprelu/config.py).
"""

from jumprelu.config import base_config
from jumprelu.launch import experiment

LAMS = (0.003, 0.01, 0.03, 0.1)


ARGS = ("stacked",)


def get_config(arg=None):
    args = experiment.parse_arg(arg, ARGS, "quickstart")
    c = base_config()
    c.data.source = "synthetic"
    c.sae.width = 512
    c.sae.sparsity_coefficient = 0.01
    c.sae.threshold_init = 0.05
    c.train.steps = 3000
    c.train.batch_size = 1024
    c.train.lr = 3e-3
    c.train.lr_warmup_steps = 100
    c.train.sparsity_warmup_steps = 1000
    c.ckpt.every_steps = 1000
    c.log.every_steps = 50
    # `train --config quickstart:stacked`: the stacked sweep's one run
    if experiment.flag(args, "stacked", "quickstart"):
        c.stack.sparsity_coefficients = LAMS
    return runlocal(c) if experiment.flag(args, "runlocal", "quickstart") else c


def runlocal(c):
    return experiment.runlocal(c, keep_data=True)  # the synthetic data are already local


def get_sweep(arg=None):
    if experiment.flag(experiment.parse_arg(arg, ARGS, "quickstart"), "stacked", "quickstart"):
        return [{"stack.sparsity_coefficients": LAMS}]
    return [{"sae.sparsity_coefficient": lam} for lam in LAMS]
