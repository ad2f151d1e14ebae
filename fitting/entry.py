"""The ``invact`` console script: checks that the fitter's extra is installed, then runs the CLI.

A runtime-only install (``pip install invact``) has torch and numpy but not the fitter's scipy,
python-flint and matplotlib; the command then says which extra to install instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import signal
import sys

# import name -> distribution, for what the fitter imports (pyproject's [fit] extra)
FIT_MODULES = {"scipy": "scipy", "sympy": "sympy", "mpmath": "mpmath", "flint": "python-flint",
               "matplotlib": "matplotlib"}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as missing
        return False


def missing_fit_modules() -> list[str]:
    """Distributions of the ``fit`` extra that cannot be imported here."""
    return [dist for module, dist in FIT_MODULES.items() if not _importable(module)]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``invact``; exit status 2 (with the install command) without the ``fit`` extra, 130
    (one line, no traceback) on a Ctrl-C before the CLI handles it: while sympy and the rest import."""
    try:
        missing = missing_fit_modules()
        if missing:
            print(f"invact: the fitter and its command line need the 'fit' extra (missing: {', '.join(missing)}); "
                  "install it with: pip install 'invact[fit]'", file=sys.stderr)
            return 2
        from .cli import main as cli_main
        return cli_main(argv)
    except KeyboardInterrupt:     # the CLI reports one during a command itself
        print("invact: interrupted (SIGINT); nothing was written", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
