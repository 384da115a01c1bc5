"""python -m tensorwire_server: the same as tensorwire-server."""

import sys

from tensorwire_server.cli import main

sys.exit(main())
