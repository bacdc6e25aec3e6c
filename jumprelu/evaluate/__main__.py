"""jumprelu evaluate ...: the same as `jumprelu evaluate ...`."""

import sys

from jumprelu.cli import main

sys.exit(main(["evaluate", *sys.argv[1:]]))
