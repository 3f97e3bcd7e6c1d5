"""``python -m cai_ray`` runs the CLI."""

import sys

from cai_ray.cli import main

sys.exit(main())
