"""Command line: python -m jumprelu.main --config experiments/quickstart.py --workdir DIR [--config.k=v]."""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jumprelu.config import ConfigError
from jumprelu.data import DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    from jumprelu import report, train  # after flag parsing: keeps --help fast

    logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    try:
        result = train.train(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, DataError) as e:
        print(f"jumprelu: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report.format_report(result))


if __name__ == "__main__":
    app.run(main)
