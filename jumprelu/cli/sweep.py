"""jumprelu sweep: see jumprelu/launch/sweep.py for what it does and its flags."""

from __future__ import annotations

from jumprelu.cli import common

# finished runs are skipped and interrupted ones resume, in the sweep driver as in each run's process
RESUMES = "finished runs are skipped, the others resume from their last checkpoint"


def run(argv: list[str]) -> int:
    from jumprelu.errors import UserError
    from jumprelu.launch import sweep

    try:
        return sweep.main(common.underscore_flags(argv))
    except UserError as e:
        return common.fail(e)
    # a read-only or full --root (the summary, a run's config.json or report), Ctrl-C at start-up
    except (KeyboardInterrupt, OSError) as e:
        if (status := common.resumable_failure(e, RESUMES)) is None:
            raise
        return status


if __name__ == "__main__":  # python -m jumprelu.cli.sweep is `jumprelu sweep` (it imported this and ran nothing)
    from jumprelu.cli import main_of

    main_of("sweep")
