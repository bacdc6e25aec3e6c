"""Plot and tabulate the newest fidelity result of each trainer, target L0 and budget.

  python benchmarks/fidelity_plot.py benchmarks/results/fidelity_smollm2.jsonl --tokens 2000000 \
      --out benchmarks/results/fidelity_smollm2_2m.png

A results file (`benchmarks/fidelity.py`'s results.jsonl, or the rows kept in benchmarks/results)
is appended in the order the runs finished, and a trainer's config changes over time (the
recipe, the baselines), so for each (trainer, target, tokens) the last row is today's version
of that trainer: that row is what this plots (L0 against FVU, one curve per trainer) and prints.
A row trained with `--override` is named under the table with its overrides (an experiment on a
trainer, or a field since made its default), so it is never taken for the plain trainer unseen.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

FIELDS = ("trainer", "target", "tokens", "l0", "fvu", "dead_fraction", "dense_fraction")
DEFAULT_KINDS = "jumprelu,matryoshka,topk,batchtopk,batchtopk_refit,saelens_jumprelu,saelens_topk"


def newest_rows(path: str, tokens: int, kinds: list[str]) -> list[dict]:
    """The last row of each (trainer, target) at this budget, for the given trainers, in their order."""
    newest = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            try:
                r = json.loads(line)
                missing = [k for k in FIELDS if k not in r]
                key = None if missing else (r["trainer"], int(r["target"]), int(r["tokens"]))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise SystemExit(f"{path}:{n}: not a fidelity result row ({type(e).__name__}: {e})") from None
            if missing:
                raise SystemExit(f"{path}:{n}: not a fidelity result row (no {', '.join(missing)})")
            if key[2] == tokens and key[0] in kinds:
                newest[key[:2]] = r
    return sorted(newest.values(), key=lambda r: (kinds.index(r["trainer"]), r["target"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a fidelity results .jsonl")
    p.add_argument("--tokens", type=int, default=2_000_000, help="the training budget to plot")
    p.add_argument("--kinds", default=DEFAULT_KINDS, help="trainers to plot, in the table's order")
    p.add_argument("--out", required=True, help="the .png to write")
    p.add_argument("--title", default="", help="default: the budget")
    args = p.parse_args()
    if not os.path.isfile(args.results):
        p.error(f"results file {args.results}: no such file")
    kinds = [k for k in args.kinds.split(",") if k]
    rows = newest_rows(args.results, args.tokens, kinds)
    if not rows:
        p.error(f"{args.results}: no rows of {', '.join(kinds)} at --tokens {args.tokens}")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fidelity  # benchmarks/fidelity.py: its plot and table

    title = args.title or f"width 4,096, batch 1,024, {args.tokens:,} tokens; FVU and L0 on held-out rows"
    fidelity.plot(rows, args.out, title)
    fidelity.print_table(rows)
    for r in rows:
        if r.get("override"):
            print(f"  {r['trainer']} at L0 target {r['target']}: trained with --override {' '.join(r['override'])}")
    print(f"\nwrote {args.out}\ncommand: python " + " ".join(shlex.quote(a) for a in sys.argv))


if __name__ == "__main__":
    main()
