"""python -m jumprelu COMMAND ...: the `jumprelu` console script (jumprelu/cli)."""

import sys

from jumprelu.cli import main

sys.exit(main())
