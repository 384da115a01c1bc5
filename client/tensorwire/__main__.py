"""python -m tensorwire: the same as the tensorwire command."""

import sys

from tensorwire.cli import main

sys.exit(main())
