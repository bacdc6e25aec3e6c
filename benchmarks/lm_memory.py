"""Per-device memory and FLOPs of the Gemma 2 harvest and delta-LM-loss evaluation, as XLA plans it.

Nothing is downloaded or allocated: the params are abstract (shapes, dtypes and the shardings the
harvest restores them with, `gemma_model.abstract_params`), and each jitted function the harvest
and the evaluation run is lowered and compiled for N simulated devices, whose compiled memory
analysis gives per-device bytes for arguments (the device's share of the params, the tokens, the
SAE), outputs and temporaries (activations, gathered weights, logits), and its cost analysis the
FLOPs each device runs (GFLOP/tok: one device's FLOPs times the devices, per token of the batch;
above the model's own FLOPs where XLA repeats work on every device). The programs are the ones
the commands run, compiled by XLA:CPU; XLA:TPU schedules and fuses differently, so read the
numbers as a close guide, not a guarantee.

  python benchmarks/lm_memory.py --model gemma2_9b --devices 8 --layers 9,20,31 --batch 8 --width 131072

--plan: the harvest of Gemma Scope's nine sites (resid, mlp, attn at three layers) in one pass
for 2B, 9B and 27B on a TPU v5e-8 (one host, 8 chips) and a v5p-16 (two hosts of 4 chips): the
LM split over one host's chips, data parallel across hosts (jumprelu.harvest.run), with the
tokens split by sequence over the chips or replicated, whichever fits and needs fewer FLOPs per
chip; planned wall time for --plan-tokens per site = tokens × FLOPs per chip per token /
(peak FLOP/s per chip × --mfu). Peak bf16 FLOP/s and HBM per chip are Google's published specs
(cloud.google.com/tpu/docs/v5e, /v5p); the MFU is an assumption, not a measurement. ~2 minutes:

  python benchmarks/lm_memory.py --plan --mfu 0.4 --plan-tokens 8e9

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
    p.add_argument(
        "--tokens",
        default="split",
        choices=("split", "replicated"),
        help="the harvest's token placement (run.token_sharding: split when the devices divide the batch)",
    )
    p.add_argument("--plan", action="store_true", help="the nine-site harvest plan for 2B/9B/27B on v5e-8 and v5p-16")
    p.add_argument("--plan-one", action="store_true", help=argparse.SUPPRESS)  # one (model, devices) of --plan
    p.add_argument("--mfu", type=float, default=0.4, help="--plan: assumed fraction of peak FLOP/s")
    p.add_argument("--plan-tokens", type=float, default=8e9, help="--plan: tokens per site (the paper: 8B)")
    return p.parse_args(argv)


# Google's published per-chip figures (bf16 peak FLOP/s, HBM); v5p-16 counts TensorCores: 8 chips.
SLICES = {
    "v5e-8": dict(chips=8, hosts=1, peak=197e12, hbm_gib=16.0),
    "v5p-16": dict(chips=8, hosts=2, peak=459e12, hbm_gib=95e9 / 2**30),
}
# Gemma Scope's three layers per model (the paper's resid/mlp/attn sites at each).
SCOPE_LAYERS = {"gemma2_2b": "5,12,19", "gemma2_9b": "9,20,31", "gemma2_27b": "10,22,34"}


def main(argv=None):
    args = parse_args(argv)
    if args.plan:
        return plan(args, argv)
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
    split = NamedSharding(mesh, P("model", None))
    n_tok = args.batch * args.seq_len
    harvest_tokens = tokens
    if args.tokens == "split" and args.batch % args.devices == 0:  # as the harvest places them
        harvest_tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32, sharding=split)
    if args.plan_one:
        return plan_one(args, model, params, tokens, split)
    columns = f"{'args GiB':>9}{'temp GiB':>9}{'out GiB':>8}{'total GiB':>10}{'GFLOP/tok':>10}{'compile s':>10}"
    print(f"{'program':<34}{columns}")

    def measure(label, fn, *fn_args) -> float:
        """Compiles fn for fn_args, prints its per-device memory and FLOPs, returns the memory total in GiB."""
        t0 = time.perf_counter()
        stats, flops = compiled_costs(fn, *fn_args)
        seconds = time.perf_counter() - t0
        a, t, o = stats.argument_size_in_bytes, stats.temp_size_in_bytes, stats.output_size_in_bytes
        total = (a + t + o - stats.alias_size_in_bytes) / gib
        per_token = flops * args.devices / n_tok / 1e9
        print(
            f"{label:<34}{a / gib:>9.2f}{t / gib:>9.2f}{o / gib:>8.2f}{total:>10.2f}{per_token:>10.2f}{seconds:>10.0f}",
            flush=True,
        )
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
        totals.append(measure(f"harvest  layer {layer}", gemma_model.site_fn(model, site), params, harvest_tokens))
        if layer == layers[0]:
            totals.append(measure("eval clean", gemma_model.token_losses(model), params, tokens))
        spliced = gemma_model.token_losses(model, site, sae_replace(None))
        totals.append(measure(f"eval spliced layer {layer} W={args.width}", spliced, params, tokens, keep, *sae))
        zeroed = gemma_model.token_losses(model, site, zero_replace)
        totals.append(measure(f"eval zero-ablated layer {layer}", zeroed, params, tokens, keep))
    # The paper's harvest in one pass: every site at every layer, one forward to the deepest.
    sites = tuple(gemma_model.check_site(model.config, name, layer) for layer in layers for name in gemma_model.SITES)
    one_pass = gemma_model.sites_fn(model, sites)
    totals.append(measure(f"harvest {len(sites)} sites, one pass", one_pass, params, harvest_tokens))
    worst = max(totals)
    verdict = "fits" if worst <= args.hbm_gib else "does NOT fit"
    print(f"largest per-device total {worst:.2f} GiB: {verdict} in {args.hbm_gib:g} GiB per chip")
    print("reproduce: python benchmarks/lm_memory.py " + " ".join(sys.argv[1:] if argv is None else argv))


def compiled_costs(fn, *fn_args):
    """(memory analysis, FLOPs per device) of fn compiled for fn_args (XLA:CPU's cost analysis of
    the partitioned program is one device's)."""
    compiled = fn.lower(*fn_args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled.memory_analysis(), float(cost["flops"])


def plan_one(args, model, params, replicated_tokens, split):
    """One JSON line: the nine-site one-pass harvest's per-device FLOPs and memory, both placements."""
    import json

    import jax
    import jax.numpy as jnp

    from jumprelu.harvest import gemma_model

    layers = [int(x) for x in args.layers.split(",")]
    sites = tuple(gemma_model.check_site(model.config, name, layer) for layer in layers for name in gemma_model.SITES)
    run = gemma_model.sites_fn(model, sites)
    out = {"model": args.model, "devices": args.devices, "layers": layers, "batch": args.batch, "seq_len": args.seq_len}
    placements = {"replicated": replicated_tokens}
    if args.batch % args.devices == 0:
        placements["split"] = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32, sharding=split)
    for name, tokens in placements.items():
        stats, flops = compiled_costs(run, params, tokens)
        total = stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
        out[name] = {"flops_per_device": flops, "gib_per_device": (total - stats.alias_size_in_bytes) / 2.0**30}
    print(json.dumps(out), flush=True)


def plan(args, argv):
    """Runs plan_one per (model, chips per host) in a fresh process (the simulated device count is
    fixed when jax starts) and prints the plan table."""
    import json
    import subprocess

    results = {}
    for model, layers in SCOPE_LAYERS.items():
        for per_host in sorted({s["chips"] // s["hosts"] for s in SLICES.values()}):
            cmd = [sys.executable, os.path.abspath(__file__), "--plan-one", "--model", model, "--layers", layers]
            cmd += ["--devices", str(per_host), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
            results[model, per_host] = json.loads(out.stdout.strip().splitlines()[-1])
    tokens_per_batch = args.batch * args.seq_len
    print(
        f"XLA:CPU plan: nine sites in one pass, batch {args.batch} x {args.seq_len}, "
        f"{args.plan_tokens:.3g} tokens per site, MFU {args.mfu:.0%} ASSUMED"
    )
    head = "| model | layers | slice | tokens | GFLOP/token | GiB/chip | tokens/s | wall time | other placement |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for model, layers in SCOPE_LAYERS.items():
        for name, sl in SLICES.items():
            per_host = sl["chips"] // sl["hosts"]
            r = results[model, per_host]
            options = [(p, r[p]) for p in ("split", "replicated") if p in r]
            fitting = [o for o in options if o[1]["gib_per_device"] <= sl["hbm_gib"]] or options
            placement, c = min(fitting, key=lambda o: o[1]["flops_per_device"])
            # The FLOPs every chip of a host runs, per token of the host's batch (repeated work included).
            per_token = c["flops_per_device"] * per_host / tokens_per_batch
            tok_s = sl["chips"] * sl["peak"] * args.mfu / per_token
            hours = args.plan_tokens / tok_s / 3600
            fit = "" if c["gib_per_device"] <= sl["hbm_gib"] else " (does NOT fit)"
            hosts = f"{sl['hosts']} host{'s' * (sl['hosts'] > 1)} x {per_host}"
            other = [
                f"{p}: {o['flops_per_device'] * per_host / tokens_per_batch / 1e9:.2f} GFLOP/token, "
                f"{o['gib_per_device']:.1f} GiB"
                for p, o in options
                if p != placement
            ]
            print(
                f"| {model} | {layers.replace(',', '/')} | {name} ({hosts}) | {placement} | {per_token / 1e9:.2f} "
                f"| {c['gib_per_device']:.1f}{fit} | {tok_s:,.0f} | {hours:.1f} h ({hours / 24:.1f} d) "
                f"| {'; '.join(other) or '-'} |"
            )
    print("reproduce: python benchmarks/lm_memory.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
