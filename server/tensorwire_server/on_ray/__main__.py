"""python -m tensorwire_server.on_ray: deploy on a Ray cluster (on_ray.cli)."""

import sys

from tensorwire_server.on_ray.cli import main

sys.exit(main())
