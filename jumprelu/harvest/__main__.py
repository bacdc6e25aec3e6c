"""jumprelu harvest ...: the same as `jumprelu harvest ...`."""

import sys

from jumprelu.cli import main

sys.exit(main(["harvest", *sys.argv[1:]]))
