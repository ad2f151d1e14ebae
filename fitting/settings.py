"""The fitter's settings that its command line names: plain Python (``invact --help`` imports this module,
not numpy or sympy). The default tolerance is :data:`invact.common.params.DEFAULT_TOLERANCE` (the runtime
reads it too)."""

__all__ = ["MIN_TOLERANCE", "MAX_TOLERANCE", "RATIONAL_MODES", "FP32_SAMPLES", "MAX_FP32_SAMPLES", "tolerance_text"]

MIN_TOLERANCE = 2e-8   # the tightest bound on g's error that float32 coefficients can represent
MAX_TOLERANCE = 1e-2   # the loosest that is still a gradient (coarser than bf16's rounding): --tolerance's
                       # range (pipeline.build_table); no refusal proposes a looser one
RATIONAL_MODES = ("auto", "never", "prefer")   # --rationals
FP32_SAMPLES = 1 << 24          # stratified float32 values checked per branch by default (--fp32-samples)
MAX_FP32_SAMPLES = 1 << 32      # as many as there are float32 values: more cannot check more


def tolerance_text(tolerance: float) -> str:
    """``tolerance`` as --help writes it, the exponent unpadded: 2e-8 and 1e-2 (``:g`` gives 2e-08, 0.01)."""
    mantissa, _, exponent = f"{tolerance:e}".partition("e")
    return f"{float(mantissa):g}e{int(exponent)}"
