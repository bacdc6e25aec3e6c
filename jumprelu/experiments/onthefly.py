"""On-the-fly training: a JumpReLU SAE trained straight from Gemma 2's forward pass, no activation store.

  jumprelu train --config onthefly:model=gemma2_9b,layer=20,site=resid --workdir RUN \
      --config.data.lm.checkpoint=gs://BUCKET/gemma2-9b --config.data.lm.tokenizer=/path/tokenizer.model \
      --config.data.lm.texts='("/data/train.jsonl",)'
  jumprelu train --config onthefly:tiny=DIR --workdir RUN   # the tiny world of `python -m jumprelu.harvest.tiny DIR`

The language model's fields (data.lm) are the harvest config's (experiments/harvest/gemma2.py,
same argument: model, layer, site, tiny=DIR); the SAE, schedule and λ are the paper's base config.
The rows, the shuffle buffer and exact resuming: jumprelu/harvest/onthefly.py and
jumprelu/data/shuffle.py. When to use it rather than harvest-then-train: README, "On-the-fly
training" (one SAE per site trained once: on-the-fly; a sweep over the same activations: a store).

Hardware: as the harvest (Gemma 2 9B: a TPU v5e-8 or larger), plus the SAE's own memory, plus
2 × data.shuffle_buffer_rows × d_model × 4 bytes of host memory (65,536 rows at 9B's 3,584:
1.9 GB). Expected run time: tiny=DIR on 2 CPU cores ~12 s; at 9B, about the harvest's time for
the same tokens (the forward dominates: README, "On-the-fly training"). `runlocal` shrinks it to
the usual CPU smoke test on synthetic data.
"""

from jumprelu.config import LM_FIELDS, base_config
from jumprelu.errors import ConfigError
from jumprelu.experiments.harvest import gemma2
from jumprelu.launch import experiment

# The harvest fields the forward needs beyond LM_FIELDS (the store's are left out).
EXTRA_LM_FIELDS = ("tiny", "dtype", "text_field", "split_paragraphs")


def get_config(arg=None):
    args = experiment.parse_arg(arg, gemma2.ARGS, "onthefly")
    if experiment.flag(args, "chat_template", "onthefly"):  # was accepted, then ignored
        raise ConfigError(
            "onthefly argument chat_template: on-the-fly training does not apply the chat template; harvest "
            "the conversations into a store (harvest/gemma3:...,chat_template=True) and train on it"
        )
    try:
        lm = gemma2.get_config(arg)
    except ConfigError as e:  # its arguments are this experiment's: named as such
        raise ConfigError(str(e).replace("harvest/gemma2 argument", "onthefly argument")) from None
    c = base_config()
    c.data.source = "lm"
    c.data.lm = {f: lm[f] for f in (*LM_FIELDS, *EXTRA_LM_FIELDS)}
    if "tiny" in args:  # the tiny world (tests, README): ~9,000 rows per pass of its texts
        c.sae.update(width=128, sparsity_coefficient=0.01, threshold_init=0.05)
        c.train.update(steps=200, batch_size=128, lr=3e-3, lr_warmup_steps=10, sparsity_warmup_steps=50)
        c.data.update(eval_rows=256, shuffle_buffer_rows=2048, scale_rows=2048)
        c.ckpt.every_steps = 100
        c.log.every_steps = 10
    return experiment.runlocal(c) if experiment.flag(args, "runlocal", "onthefly") else c
