"""jumprelu store ...: the same as `jumprelu store ...`."""

import sys

from jumprelu.cli import main

sys.exit(main(["store", *sys.argv[1:]]))
