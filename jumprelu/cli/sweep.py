"""jumprelu sweep: see jumprelu/launch/sweep.py for what it does and its flags."""

from __future__ import annotations

from jumprelu.cli import common


def run(argv: list[str]) -> int:
    from jumprelu.errors import UserError
    from jumprelu.launch import sweep

    try:
        return sweep.main(common.underscore_flags(argv))
    except UserError as e:
        return common.fail(e)
