"""The harvest's tokens/s on this machine, for the tiny Gemma 2 of `jumprelu.harvest.tiny`.

Two numbers: the whole harvest (`jumprelu.harvest.run.harvest`: tokenising, packing, the
jitted truncated forward, masking, shuffling and writing shards; its own clock, which
includes the first batch's compile) on the tiny world's texts repeated --repeat times, and
the jitted forward alone (warm, best of --forward-reps timed batches), which is what the LM
costs per token without the host-side work. Prints one JSON line, then the command.

  python benchmarks/harvest_throughput.py --out /tmp/harvest_tp --repeat 8 --seq-len 128 --batch 8

The tiny model (2 layers, d_model 64) costs ~1 MFLOP per token, so on a CPU this measures the
harvest's host-side overhead far more than the LM; a real Gemma's forward dominates on an
accelerator (see benchmarks/lm_memory.py --plan for the FLOP-based plan). Needs the gemma extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/jumprelu_harvest_throughput", help="the tiny world and the stores go here")
    p.add_argument("--repeat", type=int, default=8, help="train.txt this many times (~10k tokens each)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="sequences per forward (batch_sequences)")
    p.add_argument("--sites", default="resid", help="e.g. resid+mlp+attn: every site from one pass")
    p.add_argument("--layer", type=int, default=1, help="the tiny model has layers 0 and 1")
    p.add_argument("--devices", type=int, default=1, help="simulated CPU devices the LM is split over")
    p.add_argument("--forward-reps", type=int, default=20)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from jumprelu.experiments.harvest.gemma2 import get_config
    from jumprelu.harvest import gemma_model, tiny
    from jumprelu.harvest import text as text_lib
    from jumprelu.harvest.run import harvest, harvest_sites, load_lm, token_sharding

    world = os.path.join(args.out, "world")
    if not os.path.exists(os.path.join(world, "ckpt")):
        tiny.make(world)
    texts = os.path.join(args.out, f"train_x{args.repeat}.txt")
    with open(os.path.join(world, "train.txt")) as f, open(texts, "w") as g:
        g.write("\n\n".join([f.read()] * args.repeat))
    c = get_config(f"tiny={world},sites={args.sites},layers={args.layer}")
    c.update(texts=(texts,), seq_len=args.seq_len, batch_sequences=args.batch, progress=False, shard_rows=None)
    c.store = os.path.join(args.out, "stores", "{site}_l{layer}")
    shutil.rmtree(os.path.join(args.out, "stores"), ignore_errors=True)
    cfg = ml_collections.ConfigDict(c.to_dict())

    result = harvest(cfg)

    # The forward alone, warm: the same jitted program the harvest runs, on one full batch.
    lm = load_lm(cfg, harvest_sites(cfg))
    run = gemma_model.sites_fn(lm.model, lm.sites)
    seqs = text_lib.sequences([texts], lm.tokenizer, args.seq_len, split_paragraphs=True)
    _, tokens = next(text_lib.batches(seqs, args.batch, lm.tokenizer.special))
    tokens = jax.device_put(jnp.asarray(tokens), token_sharding(lm.mesh, args.batch))  # as the harvest places them
    jax.block_until_ready(run(lm.params, tokens))
    best = float("inf")
    for _ in range(args.forward_reps):
        t0 = time.perf_counter()
        jax.block_until_ready(run(lm.params, tokens))
        best = min(best, time.perf_counter() - t0)

    line = {
        "model": "tiny (2 layers, d_model 64)",
        "sites": args.sites,
        "layer": args.layer,
        "seq_len": args.seq_len,
        "batch_sequences": args.batch,
        "devices": jax.device_count(),
        "stored_rows": result["rows"],
        "harvest_seconds": round(result["seconds"], 2),
        "harvest_model_tokens_per_s": round(result["tokens_per_s"]),
        "harvest_stored_rows_per_s": round(result["rows"] / result["seconds"]),
        "forward_tokens_per_s": round(int(np.prod(tokens.shape)) / best),
        "platform": jax.devices()[0].platform,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(line))
    print("reproduce: python benchmarks/harvest_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
