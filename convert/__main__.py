"""`python -m openelm_mlx.convert SOURCE OUT [...]`: exactly `openelm-mlx convert SOURCE OUT [...]`."""

import sys

from openelm_mlx.cli import main

sys.exit(main(["convert", *sys.argv[1:]]))
