"""jumprelu train --config EXPERIMENT[:arg] --workdir DIR [--config.section.field=value ...]

Trains the SAE the experiment describes, or resumes it from DIR's latest checkpoint, and
prints the held-out report. Exit status: 0 done, 2 bad input (one line), 3 diverged (one
line naming the last good checkpoint), 75 stopped by SIGTERM/SIGINT after saving the
current step (run the same command again to resume).
"""

from __future__ import annotations

import sys

from jumprelu.cli import common

RESUMES = "it resumes from its last checkpoint"


def run(argv: list[str]) -> int:
    from absl import flags
    from ml_collections import config_flags

    try:
        argv = common.resolve_config_flags(common.underscore_flags(argv))
    except ValueError as e:
        return common.fail(e)
    common.define_experiments_dir_flag(__name__)
    config = config_flags.DEFINE_config_file("config", None, "Experiment (path, or name).", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
    flags.mark_flags_as_required(["config", "workdir"])

    def main() -> int:
        from jumprelu.errors import EXIT_PREEMPTED, UserError
        from jumprelu.train import loop, preemption, report
        from jumprelu.train.preemption import Preempted

        common.quiet_libraries(flags.FLAGS)
        try:
            from jumprelu.launch.experiment import require_training

            # a harvest experiment: one line naming it, not an AttributeError
            require_training(config.value, f"--config {config_flags.get_config_filename(flags.FLAGS['config'])}")
            from jumprelu import config as config_lib
            from jumprelu.launch import overrides

            config_lib.check_overrides(config.value, overrides.fields(argv))
            if config.value.data.source == "lm":  # rows from the language model: imports gemma
                config_lib.validate(config.value)  # a bad field is one line before gemma's ~5 s import
                from jumprelu.harvest import onthefly

                result = onthefly.train(config.value, workdir.value)
            else:
                result = loop.train(config.value, workdir.value)
            preemption.ignore_from_now()
        except UserError as e:
            return common.fail(e)
        except Preempted as e:
            print(f"jumprelu: {e}", file=sys.stderr)
            return EXIT_PREEMPTED
        # Ctrl-C outside the loop (start-up, report) or a second one in it; config.json or the report
        # on a full disk (checkpoints say so themselves)
        except (KeyboardInterrupt, OSError) as e:
            if (status := common.resumable_failure(e, RESUMES)) is None:
                raise
            return status
        print(report.format_report(result))
        return 0

    return common.absl_run(main, argv, "jumprelu train")


if __name__ == "__main__":  # python -m jumprelu.cli.train is `jumprelu train` (it imported this and ran nothing)
    from jumprelu.cli import main_of

    main_of("train")
