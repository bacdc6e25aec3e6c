"""python -m jumprelu.export ...: the same as `jumprelu export ...`."""

import sys

from jumprelu.cli import main

sys.exit(main(["export", *sys.argv[1:]]))
