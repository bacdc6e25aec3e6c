"""jumprelu export WORKDIR OUT [--format gemma-scope] [--member i] [--step N]

Writes a trained SAE in a file format other tools read:
  gemma-scope   Gemma Scope's params.npz (folded W_enc, b_enc, threshold, W_dec, b_dec);
                JumpReLU, ReLU, Gated and BatchTopK SAEs are exact; TopK is refused
"""

from __future__ import annotations

import argparse

from jumprelu.cli import common

FORMATS = ("gemma-scope",)


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jumprelu export", description=__doc__.splitlines()[0])
    p.add_argument("workdir", help="training workdir (or a stacked run's WORKDIR/sae-i)")
    p.add_argument("output", help="file or directory to write")
    p.add_argument("--format", choices=FORMATS, default="gemma-scope")
    p.add_argument("--member", type=int, default=None, help="which SAE of a stacked run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = p.parse_args(common.underscore_flags(argv))
    from jumprelu.errors import UserError
    from jumprelu.export import gemma_scope
    from jumprelu.export.load import load

    try:
        sae = load(args.workdir, step=args.step, member=args.member)
        gemma_scope.export(sae, args.output)
    except (UserError, FileNotFoundError, ValueError) as err:
        return common.fail(err)
    print(f"wrote {args.output}: d_model {sae.d_model}, width {sae.width}, step {sae.step}")
    return 0
