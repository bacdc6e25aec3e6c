"""jumprelu tpu: see jumprelu/launch/tpu.py for what it does and its flags."""

from __future__ import annotations

import sys

from jumprelu.cli import common


def run(argv: list[str]) -> int:
    from jumprelu.errors import UserError
    from jumprelu.launch import tpu

    try:
        return tpu.main(common.underscore_flags(argv))
    except UserError as e:
        return common.fail(e)
    except KeyboardInterrupt:  # `tpu watch` and `tpu logs` run until Ctrl-C; the slice goes on
        print("jumprelu tpu: stopped (the slice and its runs are not touched)", file=sys.stderr)
        return common.EXIT_INTERRUPTED


if __name__ == "__main__":  # python -m jumprelu.cli.tpu is `jumprelu tpu` (it imported this and ran nothing)
    from jumprelu.cli import main_of

    main_of("tpu")
