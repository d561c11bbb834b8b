"""The `openelm-mlx` command (console script and `python -m openelm_mlx.cli`).

`main` puts the optimized BLAS in place before anything imports mlx.core, so this module imports
nothing that does: the parser and the subcommands (`commands`) are imported after it.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import List, Optional

from .blas import use_optimized_blas
from .errors import OpenELMError


def _place_blas() -> None:
    """use_optimized_blas(), its warnings as one line each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        use_optimized_blas()
    for warning in caught:
        print(f"openelm-mlx: warning: {warning.message}", file=sys.stderr)


def _silence_stdout() -> None:
    """After the reader of stdout went away (`openelm-mlx generate ... | head`): nothing more is written
    there, not even the interpreter's final flush."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (2 for errors a user can fix)."""
    _place_blas()  # first: MLX binds its BLAS when mlx.core is first imported
    from .commands import build_parser  # imports mlx: only now

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except OpenELMError as e:
        print(f"openelm-mlx {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
