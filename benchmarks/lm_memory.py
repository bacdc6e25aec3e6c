"""Per-device memory of the Gemma 2 harvest and delta-LM-loss evaluation, as XLA plans it.

Nothing is downloaded or allocated: the params are abstract (shapes, dtypes and the shardings the
harvest restores them with, `gemma_model.abstract_params`), and each jitted function the harvest
and the evaluation run is lowered and compiled for N simulated devices, whose compiled memory
analysis gives per-device bytes for arguments (the device's share of the params, the tokens, the
SAE), outputs and temporaries (activations, gathered weights, logits). The programs are the ones
the commands run, compiled by XLA:CPU; XLA:TPU schedules and fuses differently, so read the
numbers as a close guide, not a guarantee.

  python benchmarks/lm_memory.py --model gemma2_9b --devices 8 --layers 9,20,31 --batch 8 --width 131072

Needs the gemma extra (pip install -e '.[gemma]').
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma2_9b", help="gemma2_2b | gemma2_9b | gemma2_27b")
    p.add_argument("--devices", type=int, default=8, help="chips the params are split over (simulated)")
    p.add_argument("--layers", default="9,20,31")
    p.add_argument("--site", default="resid", help="resid | mlp | attn")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch (the configs' default: 8)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--width", type=int, default=131072, help="SAE width spliced in by the evaluation")
    p.add_argument("--dtype", default="bfloat16", help="the LM's params and compute (the configs' default: bfloat16)")
    p.add_argument("--hbm-gib", type=float, default=16.0, help="memory per chip to compare with (v5e: 16)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Simulated devices must be requested before jax starts.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jumprelu.harvest import gemma_model
    from jumprelu.harvest.lm_eval import sae_replace, sae_shardings, zero_replace

    model = gemma_model.make_model(args.model, dtype=jnp.dtype(args.dtype))
    mesh = gemma_model.device_mesh()
    params = gemma_model.abstract_params(model, mesh)
    param_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params))
    replicated = NamedSharding(mesh, P())

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    tokens = spec((args.batch, args.seq_len), jnp.int32)
    keep = spec((args.batch, args.seq_len), jnp.bool_)
    gib = 2.0**30
    print(
        f"{args.model}: params {param_bytes / 1e9:.1f} GB ({jnp.dtype(model.dtype).name}),"
        f" split over {args.devices} devices; batch {args.batch} x {args.seq_len} tokens; site {args.site}"
    )
    print(f"{'program':<34}{'args GiB':>9}{'temp GiB':>9}{'out GiB':>8}{'total GiB':>10}{'compile s':>10}")

    def measure(label, fn, *fn_args) -> float:
        """Compiles fn for fn_args, prints its per-device memory, returns the total in GiB."""
        t0 = time.perf_counter()
        stats = fn.lower(*fn_args).compile().memory_analysis()
        seconds = time.perf_counter() - t0
        a, t, o = stats.argument_size_in_bytes, stats.temp_size_in_bytes, stats.output_size_in_bytes
        total = (a + t + o - stats.alias_size_in_bytes) / gib
        print(f"{label:<34}{a / gib:>9.2f}{t / gib:>9.2f}{o / gib:>8.2f}{total:>10.2f}{seconds:>10.0f}", flush=True)
        return total

    layers = [int(x) for x in args.layers.split(",")]
    totals = []
    for layer in layers:
        site = gemma_model.check_site(model.config, args.site, layer)
        d = gemma_model.site_width(model.config, args.site)
        shapes = ((d, args.width), (args.width,), (args.width,), (args.width, d), (d,))
        sae = tuple(
            jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)
            for shape, sharding in zip(shapes, sae_shardings(mesh, args.width), strict=True)
        )  # as the evaluation places them
        totals.append(measure(f"harvest  layer {layer}", gemma_model.site_fn(model, site), params, tokens))
        if layer == layers[0]:
            totals.append(measure("eval clean", gemma_model.token_losses(model), params, tokens))
        spliced = gemma_model.token_losses(model, site, sae_replace(None))
        totals.append(measure(f"eval spliced layer {layer} W={args.width}", spliced, params, tokens, keep, *sae))
        zeroed = gemma_model.token_losses(model, site, zero_replace)
        totals.append(measure(f"eval zero-ablated layer {layer}", zeroed, params, tokens, keep))
    # The paper's harvest in one pass: every site at every layer, one forward to the deepest.
    sites = tuple(gemma_model.check_site(model.config, name, layer) for layer in layers for name in gemma_model.SITES)
    totals.append(measure(f"harvest {len(sites)} sites, one pass", gemma_model.sites_fn(model, sites), params, tokens))
    worst = max(totals)
    verdict = "fits" if worst <= args.hbm_gib else "does NOT fit"
    print(f"largest per-device total {worst:.2f} GiB: {verdict} in {args.hbm_gib:g} GiB per chip")
    print("reproduce: python benchmarks/lm_memory.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
