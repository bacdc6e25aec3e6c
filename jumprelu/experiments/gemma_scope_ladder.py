"""The Gemma Scope width ladder on Gemma 2 9B, layer 20 residual stream: widths 2^14 to 2^20.

  jumprelu sweep gemma_scope_ladder:stores=/gcs/BUCKET/stores/gemma2-9b --dry_run
  jumprelu tpu run NAME --sweep gemma_scope_ladder:stores=/gcs/BUCKET/stores/gemma2-9b \\
      --workdir gs://BUCKET/runs/gemma_scope_ladder

Hardware: TPU v5p-8 up to 2^19; v5p-32 for 2^20. Expected run time, from the scale planner at
50% of peak (`jumprelu plan --config gemma_scope_ladder:width=N
--topology v5p-8 --matmul_efficiency 0.5`): 2^14 2.8 ms/step, ~0.8 h per SAE for 4B tokens
(three stacked ~2.3 h; one SAE would need 21 GB/s of input, so at this width the store's read
rate, not the chips, sets the pace); 2^17 21 ms/step, ~11.5 h per SAE (8B tokens, ~35 h for
the stacked three); 2^20 168 ms/step and 44 GiB per device on v5p-8 (~180 h per SAE), 42 ms
on v5p-32 (~46 h per SAE for 16B tokens).

Token budgets as Gemma Scope trained them: 4B tokens at width 16K, 8B for 32K-512K, 16B for 1M.
Each width is trained at three λ (one L0 range each) stacked in one run where the width fits
three times (up to 2^17), separately above. Data: `{stores}/resid_l20`.

Argument: width=2^N restricts to one width (e.g. width=65536); stores=PATH; runlocal.
"""

from jumprelu.config import base_config
from jumprelu.errors import ConfigError
from jumprelu.launch import experiment

WIDTHS = tuple(2**n for n in range(14, 21))
LAMS = (2e-4, 6e-4, 2e-3)
STACK_UP_TO = 2**17
DEFAULT_STORES = "/gcs/YOUR_BUCKET/stores/gemma2-9b"


def tokens_for(width: int) -> int:
    return 4_000_000_000 if width <= 2**14 else 16_000_000_000 if width >= 2**20 else 8_000_000_000


ARGS = ("width", "stores")


def _width(args, default):
    width = experiment.number(args, "width", default, "gemma_scope_ladder", int)
    if width <= 0:
        raise ConfigError(f"gemma_scope_ladder argument width must be positive, found {width}")
    return width


def get_config(arg=None):
    args = experiment.parse_arg(arg, ARGS, "gemma_scope_ladder")
    width = _width(args, 2**14)
    c = base_config()
    c.sae.width = width
    c.data.source = f"{args.get('stores', DEFAULT_STORES)}/resid_l20"
    c.data.d_model = 3584
    c.train.batch_size = 4096
    c.train.steps = tokens_for(width) // c.train.batch_size
    # Split the dictionary over every device (Gemma Scope used pure data parallelism at 16K;
    # splitting M works at every width and its only reduction is the [B, d_model] sum).
    c.mesh.update(data=1, model=-1)
    c.ckpt.update(every_steps=10_000, keep=2)
    c.log.every_steps = 1000
    if experiment.flag(args, "runlocal", "gemma_scope_ladder"):
        experiment.runlocal(c)
    return c


def get_sweep(arg=None):
    args = experiment.parse_arg(arg, ARGS, "gemma_scope_ladder")
    widths = [_width(args, None)] if "width" in args else list(WIDTHS)
    runs = []
    for width in widths:
        size = {"sae.width": width, "train.steps": tokens_for(width) // 4096}
        if width <= STACK_UP_TO:
            runs.append({**size, "stack.sparsity_coefficients": LAMS})
        else:
            runs += [{**size, "sae.sparsity_coefficient": lam} for lam in LAMS]
    return runs
