"""The paper's comparison on Gemma 2 9B: JumpReLU, Gated and TopK at 9 site/layer pairs, 8B tokens each.

  jumprelu sweep gemma2_9b_comparison:stores=/gcs/BUCKET/stores/gemma2-9b --dry_run
  jumprelu tpu run NAME --sweep gemma2_9b_comparison:stores=/gcs/BUCKET/stores/gemma2-9b \\
      --workdir gs://BUCKET/runs/gemma2_9b_comparison          # on a TPU slice, see README

Hardware: a TPU v5p-8 (4 chips) per run, or larger. Expected run time (scale planner,
`jumprelu plan --config gemma2_9b_comparison --topology v5p-8
--matmul_efficiency 0.5`): 21 ms per 4,096-token step (5.6 GiB per device, 2.8 GB/s of input),
so ~11.5 h per SAE for 1,953,125 steps (8B tokens): the 162 SAEs are ~1,900 v5p-8-hours.
`stack` does not reduce that compute; it reads each site's data once per six SAEs.

Data: one activation store per site and layer, `{stores}/{site}_l{L}`: the harvest's store
template `{site}_l{layer}` (or `jumprelu store convert`),, read through a local or gcsfuse path.
Sites: resid (block output, d 3584), mlp (MLP output after the post-MLP norm, d 3584), attn
(attention output before W_O, 16 heads × 256 = d 4096). Layers 9, 20, 31. Width 131,072.

Argument (EXPERIMENT:arg, comma-separated): site=…, layer=…, kind=… restrict the sweep;
stores=PATH sets where the stores are; `stack` trains each (site, layer) λ sweep of JumpReLU
and Gated as K stacked SAEs in one run (the data read once for all λ); runlocal shrinks every
run to a CPU smoke test on synthetic data.

λ grid: the paper sweeps λ per site to span L0 ≈ 10-150 and does not list the values; these
grids are a starting point on inputs normalised to E‖x‖² = 1. TopK sweeps k over the same L0s.
"""

from jumprelu.config import base_config
from jumprelu.launch import experiment
from jumprelu.store.format import site_store_name

D_MODEL = {"resid": 3584, "mlp": 3584, "attn": 4096}
LAYERS = (9, 20, 31)
TOKENS = 8_000_000_000
SWEEP = {
    "jumprelu": ("sae.sparsity_coefficient", [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3]),
    "gated": ("sae.sparsity_coefficient", [3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]),
    "topk": ("sae.k", [10, 20, 40, 80, 160, 320]),
}
DEFAULT_STORES = "/gcs/YOUR_BUCKET/stores/gemma2-9b"


ARGS = ("site", "layer", "kind", "stores", "stack")  # what get_config and get_sweep read
NAME = "gemma2_9b_comparison"


def _site(args):
    return experiment.choice(args, "site", tuple(D_MODEL), "resid", NAME)


def get_config(arg=None):
    args = experiment.parse_arg(arg, ARGS, NAME)
    site, layer = _site(args), experiment.number(args, "layer", 20, NAME, int)
    c = base_config()
    c.sae.kind = experiment.choice(args, "kind", tuple(SWEEP), "jumprelu", NAME)
    c.sae.width = 131072
    c.data.source = f"{args.get('stores', DEFAULT_STORES)}/{site_store_name(site, layer)}"
    c.data.d_model = D_MODEL[site]
    c.train.batch_size = 4096
    c.train.steps = TOKENS // c.train.batch_size
    c.mesh.update(data=1, model=-1)  # split the dictionary: the only reduction is [B, d_model]
    c.ckpt.update(every_steps=10_000, keep=2)
    c.log.every_steps = 1000
    if experiment.flag(args, "stack", NAME) and args.get("kind") in ("jumprelu", "gated"):
        # `train --config gemma2_9b_comparison:stack,kind=gated`: that λ sweep as one stacked run (as
        # the sweep runs it; without a kind the sweep's base stays unstacked, for its TopK runs)
        c.stack.sparsity_coefficients = tuple(SWEEP[c.sae.kind][1])
    if experiment.flag(args, "runlocal", NAME):
        experiment.runlocal(c)
    return c


def get_sweep(arg=None):
    args = experiment.parse_arg(arg, ARGS, NAME)
    sites = [_site(args)] if "site" in args else list(D_MODEL)
    layers = [experiment.number(args, "layer", None, NAME, int)] if "layer" in args else list(LAYERS)
    kinds = [experiment.choice(args, "kind", tuple(SWEEP), None, NAME)] if "kind" in args else list(SWEEP)
    stack = experiment.flag(args, "stack", NAME)
    runs = []
    for site in sites:
        for layer in layers:
            where = {"data.source": f"{args.get('stores', DEFAULT_STORES)}/{site_store_name(site, layer)}"}
            if site != "resid":
                where["data.d_model"] = D_MODEL[site]
            for kind in kinds:
                field, values = SWEEP[kind]
                if stack and kind != "topk":
                    runs.append({**where, "sae.kind": kind, "stack.sparsity_coefficients": tuple(values)})
                else:
                    runs += [{**where, "sae.kind": kind, field: v} for v in values]
    return runs
