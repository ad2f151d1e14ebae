"""Error curves of a table against the information floors (shared by the CLI and the notebooks).

The *information floor* (docs: /work/shared/design.md) is what storing y in a narrow format costs
even with a perfect inverse: max over x on a fine grid of |f'(x) - g(round_dtype(f(x)))|.
"""

from __future__ import annotations

import os

import numpy as np

from .evaluate import number

__all__ = ["DTYPES", "DESIGN_FLOORS", "PAPER_ERRORS", "round_to", "information_floor", "plot_error_curves"]

DTYPES = ("bf16", "fp16", "fp32")
# design.md, "save output (floor)" column: the measured figures the computed floors reproduce.
DESIGN_FLOORS = {"gelu": {"bf16": 1.56e-2, "fp16": 6.57e-3, "fp32": 4.31e-5},
                 "silu": {"bf16": 1.50e-2, "fp16": 4.93e-3, "fp32": 5.61e-5}}
# Max derivative error of the Inverted Activations reference code (design.md, "Anchors").
PAPER_ERRORS = {"gelu": 1.87e-2, "silu": 2.9e-3}
_FLOOR_GRID = 2_000_001          # x step 8e-6 on [-8, 8]


def round_to(y: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to ``dtype`` (bf16 via float32, round-to-nearest-even) and back."""
    y = np.asarray(y, dtype=np.float64)
    with np.errstate(over="ignore"):
        if dtype == "fp32":
            return y.astype(np.float32).astype(np.float64)
        if dtype == "fp16":
            return y.astype(np.float16).astype(np.float64)
        if dtype == "bf16":
            bits = y.astype(np.float32).view(np.uint32).astype(np.uint64)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def information_floor(table: dict, dtype: str, lo: float = -8.0, hi: float = 8.0,
                      n: int = _FLOOR_GRID) -> float:
    """max |f'(x) - g(round_dtype(f(x)))| for x on a grid of [lo, hi], g from the float64 reference.

    Each x is inverted on its own branch (the stored code tells the backward which one); flat
    branches cost nothing. Uses only the table's formula and branch ranges, never its pieces.
    """
    from .certify import branch_reference
    x = np.linspace(lo, hi, n)
    worst = 0.0
    for i, b in enumerate(table["branches"]):
        a, c = (number(v, table["params"]) for v in b["x_range"])
        ref = branch_reference(table, i)
        xs = x[(x >= a) & (x <= c)]
        if ref is None or xs.size == 0:
            continue
        err = np.abs(ref.value(xs) - ref(round_to(ref.f(xs), dtype)))
        worst = max(worst, float(np.nanmax(err)))
    return worst


def _curve(table: dict, index: int, y_max: float, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """:func:`evaluate.error_curve`'s error on y in the branch's range clipped to [-y_max, y_max]."""
    from .certify import branch_reference, branch_sample_range
    from .evaluate import eval_code_class
    lo, hi = branch_sample_range(table, index)
    lo, hi = max(lo, -y_max), min(hi, y_max)
    s = np.geomspace(1e-12, 1.0, n // 4)                      # clustered at both ends (singularities)
    y = np.unique(np.concatenate([np.linspace(lo, hi, n // 2), lo + (hi - lo) * s, hi - (hi - lo) * s]))
    cc = table["code_classes"][table["branches"][index]["code"]]
    return y, np.abs(eval_code_class(cc, y, table["params"]) - branch_reference(table, index)(y))


def plot_error_curves(table: dict, path: str | os.PathLike | None = None, ax=None, floors: bool = True,
                      y_max: float = 16.0):
    """|g~(y) - g(y)| per branch on a log scale, with the dtype floors, tolerance and paper figures.

    Draws y in [-y_max, y_max] into ``ax`` (a new figure otherwise); saves to ``path`` when given.
    Returns the figure.
    """
    import matplotlib
    if ax is None and path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(9, 5))
    tiny = 1e-18                                      # log axis: exact zeros are drawn here
    for b in table["branches"]:
        if b["direction"] == "constant":
            continue
        y, err = _curve(table, b["index"], y_max)
        ax.plot(y, np.maximum(err, tiny), lw=0.8, label=f"branch {b['index']} ({b['direction']})")
    ax.axhline(table["tolerance"], color="k", ls="--", lw=1, label=f"tolerance {table['tolerance']:.3g}")
    if floors and table["target"] == "derivative":
        for dtype, color in zip(DTYPES, ("tab:red", "tab:orange", "tab:green")):
            floor = information_floor(table, dtype)
            if floor > 0:
                ax.axhline(floor, color=color, ls=":", lw=1.2, label=f"{dtype} information floor {floor:.3g}")
    if table["name"] in PAPER_ERRORS:
        ax.axhline(PAPER_ERRORS[table["name"]], color="tab:purple", ls="-.", lw=1,
                   label=f"reference code's error {PAPER_ERRORS[table['name']]:.3g}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=tiny)
    ax.set_xlabel("y = f(x)")
    ax.set_ylabel("|g~(y) - g(y)|" if table["target"] == "derivative" else "|x~(y) - x(y)|")
    ax.set_title(f"{table['name']}: approximation error per branch ({table['target']} table)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
