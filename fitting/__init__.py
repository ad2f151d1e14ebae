"""invact.fitting — the offline fitter: formula -> branches -> certified coefficient tables."""
from .formulas import BUILTINS, ActivationSpec, SpecError, get_spec

__all__ = ["BUILTINS", "ActivationSpec", "SpecError", "get_spec"]
