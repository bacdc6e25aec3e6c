"""python -m jumprelu.train ...: the same as `jumprelu train ...`."""

import sys

from jumprelu.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
