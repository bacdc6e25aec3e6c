"""jumprelu store: activation store commands.

  jumprelu store convert ACTS.npy STORE_DIR [--dtype bfloat16] [--model ...] [--site ...]
  jumprelu store summary STORE_DIR [--verify] [--json]

`convert` resumes where an interrupted conversion stopped: run the same command again.
"""

from __future__ import annotations

import argparse
import json

from jumprelu import errors
from jumprelu.cli import common
from jumprelu.errors import UserError
from jumprelu.store import checksum
from jumprelu.store.convert import convert, summary
from jumprelu.store.reader import open_store

RESUMES = "a conversion resumes after its last complete shard"


def run(argv: list[str]) -> int:
    # the whole docstring (its examples, that convert resumes), as sweep's and tpu's --help show theirs
    raw = argparse.RawDescriptionHelpFormatter
    parser = errors.ArgumentParser(prog="jumprelu store", description=__doc__, formatter_class=raw)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write a .npy [N, d_model] file into a new store", description=__doc__)
    c.formatter_class = raw
    c.add_argument("input", help="a .npy file of activations, [N, d_model]")
    c.add_argument("output", help="the store directory to write (new, or an interrupted conversion's)")
    c.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="how the rows are stored")
    # provenance, recorded in the store and carried into exports (the SAELens hook name, Neuronpedia ids)
    c.add_argument("--model", default="", help="the model the rows came from, e.g. gemma2_2b")
    c.add_argument(
        "--site",
        default="",
        help="where in the model: resid (or resid_post), mlp (mlp_out), attn (attn_out) give exports their "
        "hook name, e.g. resid and --layer 12: blocks.12.hook_resid_post; any other name is kept as is",
    )
    c.add_argument("--layer", type=int, default=None, help="the layer the site is in")
    c.add_argument("--text_source", default="", help="the texts the rows were computed on (recorded only)")
    c.add_argument("--shard_rows", type=int, default=None, help="rows per shard (default: about 256 MiB)")
    c.add_argument("--seed", type=int, default=0, help="seed of the shuffle within each shard")
    c.add_argument("--no_shuffle", action="store_true", help="keep the input order within shards")
    s = sub.add_parser("summary", help="validate a store and print what it holds")
    s.add_argument("store")
    s.add_argument("--verify", action="store_true", help="re-read every row: checksums and NaN/Inf count")
    s.add_argument("--json", action="store_true")
    args = parser.parse_args(common.underscore_flags(argv))
    try:
        if args.command == "convert":
            convert(
                args.input,
                args.output,
                dtype=args.dtype,
                model=args.model,
                site=args.site,
                layer=args.layer,
                text_source=args.text_source,
                shuffle_seed=None if args.no_shuffle else args.seed,
                shard_rows=args.shard_rows,
            )
            out = summary(open_store(args.output, nonfinite="drop"))
        else:
            # without --verify, a sample of blocks as a training start reads (every row: --verify)
            sample = 0 if args.verify else checksum.START_SAMPLE_BLOCKS
            store = open_store(args.store, nonfinite="drop", verify=args.verify, sample_blocks=sample)
            out = summary(store, verified=bool(args.verify))
    except UserError as e:
        return common.fail(e)
    except (KeyboardInterrupt, OSError) as e:
        if (status := common.resumable_failure(e, RESUMES)) is None:
            raise
        return status
    if getattr(args, "json", False):
        print(json.dumps(out, indent=1))
    else:
        width = max(map(len, out))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":  # python -m jumprelu.cli.store is `jumprelu store` (it imported this and ran nothing)
    from jumprelu.cli import main_of

    main_of("store")
