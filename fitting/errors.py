"""Typed errors of the fitter. The CLI maps InputError subclasses to exit code 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a formula, name, parameter, bound or file the user gave."""


class SpecError(InputError):
    """A formula, name or parameter that cannot define an activation."""


class ScaleError(SpecError):
    """f changes on a scale of x finer than the fitter's scans resolve (tanh(a*x)/a with a = 1e20 rises
    within |x| < 1e-19); :func:`.pipeline.build_table` adds the parameters that set that scale."""


class FitError(InputError):
    """The requested bound cannot be met; carries the best error reached and what to relax."""

    def __init__(self, message: str, best_error: float | None = None, advice: str = "",
                 label: str = "best error reached"):
        if best_error is not None:
            message += f" ({label} {best_error:.3g}; {advice})"
        elif advice:
            message += f"; {advice}"
        super().__init__(message)
        self.best_error = best_error
        self.advice = advice


class TableError(InputError):
    """A table file that is missing, corrupt, hand-edited or of another format version."""


class WriteError(InputError):
    """An output folder or file that cannot be written (permissions, a read-only or full file system)."""


class CertificationError(RuntimeError):
    """A fitted table failed certification (an internal failure: the fitter should have refined)."""
