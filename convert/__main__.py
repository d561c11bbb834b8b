"""`python -m openelm_mlx.convert SOURCE OUT [...]`."""

import sys

from .cli import main

sys.exit(main())
