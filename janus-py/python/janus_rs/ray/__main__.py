"""``python -m janus_rs.ray``: see ``janus_rs.ray.cli``."""

import sys

from .cli import main

sys.exit(main())
