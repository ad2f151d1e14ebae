"""Error curves of tables against the information floors (shared by the CLI and the notebooks).

The *information floor* (docs/floors.md) is what storing y in a narrow format costs
even with a perfect inverse: max over x on a fine grid of |f'(x) - g(round_dtype(f(x)))|.

* :func:`plot_error_curves` — one table: |g~(y) - g(y)| per branch, the floors, the tolerance and, for
  GELU and SiLU, the error of the Inverted Activations reference code (``invact plot``);
* :func:`plot_all_error_curves` — every derivative table of a project tree, one panel each;
* :func:`plot_gradient_errors` — end-to-end gradient errors over x (computed by the caller, e.g. with
  torch) against the floors.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping

import numpy as np

from .float32 import round_to
from .interrupts import signals_deferred
from .model import Table, number

__all__ = ["DTYPES", "DESIGN_FLOORS", "PAPER_ERRORS", "round_to", "information_floor", "information_floors",
           "plot_error_curves", "plot_all_error_curves", "plot_gradient_errors"]

DTYPES = ("bf16", "fp16", "fp32")
# docs/floors.md, "save output (floor)" column: the measured figures the computed floors reproduce.
DESIGN_FLOORS = {"gelu": {"bf16": 1.56e-2, "fp16": 6.57e-3, "fp32": 4.31e-5},
                 "silu": {"bf16": 1.50e-2, "fp16": 4.93e-3, "fp32": 5.61e-5}}
# Max derivative error of the Inverted Activations reference code (docs/floors.md, "Anchors").
PAPER_ERRORS = {"gelu": 1.87e-2, "silu": 2.9e-3}
FLOOR_GRID = 2_000_001           # x step 8e-6 on [-8, 8]
_FLOOR_COLORS = dict(zip(DTYPES, ("tab:red", "tab:orange", "tab:green")))
_CURVE_COLORS = ("tab:blue", "tab:cyan", "tab:brown", "tab:olive", "tab:pink", "tab:gray")  # none of the lines'
_TINY = 1e-18                    # lowest bottom of a log axis


def information_floor(table: dict, dtype: str, lo: float = -8.0, hi: float = 8.0,
                      n: int = FLOOR_GRID) -> float:
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


def information_floors(table: dict, n: int = FLOOR_GRID) -> dict[str, float]:
    """:func:`information_floor` for every dtype of :data:`DTYPES` (x grid of ``n`` points on [-8, 8])."""
    return {dtype: information_floor(table, dtype, n=n) for dtype in DTYPES}


def _curve(table: dict, index: int, y_max: float, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """y inside the branch's range clipped to [-y_max, y_max] and |g~(y) - g(y)| / max(1, |g(y)|).

    The ends are left out: where branches touch, the table follows the piece PyTorch gives the kink.
    """
    from .certify import branch_reference, branch_sample_range
    lo, hi = branch_sample_range(table, index)
    lo, hi = max(lo, -y_max), min(hi, y_max)
    s = np.geomspace(1e-12, 1.0, n // 4)                      # clustered at both ends (singularities)
    y = np.unique(np.concatenate([np.linspace(lo, hi, n // 2), lo + (hi - lo) * s, hi - (hi - lo) * s]))
    y = y[(y > lo) & (y < hi)]          # open range (see above)
    cc = Table.of(table).code_class_of(index)
    g = branch_reference(table, index)(y)
    return y, np.abs(cc.evaluate(y, table["params"]) - g) / np.maximum(1.0, np.abs(g))


def _hlines(ax, values: Mapping[str, float], what: str) -> None:
    """Horizontal dotted lines, one per dtype (zero floors are not drawn)."""
    for dtype, value in values.items():
        if value > 0:
            ax.axhline(value, color=_FLOOR_COLORS.get(dtype), ls=":", lw=1.2, label=f"{dtype} {what} {value:.3g}")


def _axes(ax, figsize: tuple[float, float], path):
    """(figure, axes): ``ax`` and its figure, or a new figure (Agg when only saved to a file)."""
    with signals_deferred():                            # its extensions (pybind11) call Python
        import matplotlib
        if ax is None and path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return (ax.figure, ax) if ax is not None else plt.subplots(figsize=figsize)


def _finish(fig, ax, path, fontsize: float) -> None:
    ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=fontsize, loc="upper right")
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_error_curves(table: dict, path: str | os.PathLike | None = None, ax=None, floors: bool = True,
                      y_max: float = 16.0, floor_grid: int = FLOOR_GRID, fontsize: float = 8):
    """|g~(y) - g(y)| per branch on a log scale, with the dtype floors, tolerance and paper figures.

    Draws y in [-y_max, y_max] into ``ax`` (a new figure otherwise); errors are relative where
    |g| > 1, as in the certificate. The floors use an x grid of ``floor_grid`` points. Saves to
    ``path`` when given. Returns the figure.
    """
    fig, ax = _axes(ax, (9, 5), path)
    curves = {b.index: _curve(table, b.index, y_max) for b in Table.of(table).branches if not b.flat}
    positive = [e[e > 0].min() for _, e in curves.values() if (e > 0).any()]
    bottom = max(_TINY, 0.1 * min(positive, default=_TINY))      # exact zeros are drawn at the bottom
    for (index, (y, err)), color in zip(curves.items(), itertools.cycle(_CURVE_COLORS)):
        b = table["branches"][index]
        label = f"branch {index} ({b['direction']}, {b['route']})"
        ax.plot(y, np.maximum(err, bottom), lw=0.8, color=color, label=label)
    ax.axhline(table["tolerance"], color="k", ls="--", lw=1, label=f"tolerance {table['tolerance']:.3g}")
    if floors and table["target"] == "derivative":
        _hlines(ax, information_floors(table, floor_grid), "information floor")
    if table["name"] in PAPER_ERRORS:
        ax.axhline(PAPER_ERRORS[table["name"]], color="tab:purple", ls="-.", lw=1,
                   label=f"reference code's error {PAPER_ERRORS[table['name']]:.3g}")
    ax.set_ylim(bottom=bottom)
    ax.set_xlabel("y = f(x)")
    ax.set_ylabel("|g~(y) - g(y)|" if table["target"] == "derivative" else "|x~(y) - x(y)|")
    ax.set_title(f"{table['name']}: approximation error per branch ({table['target']} table)")
    _finish(fig, ax, path, fontsize)
    return fig


def plot_all_error_curves(root: str | os.PathLike | None = None, path: str | os.PathLike | None = None,
                          ncols: int = 3, floor_grid: int = FLOOR_GRID):
    """:func:`plot_error_curves` for every derivative table under ``root`` (default: the project's).

    One panel per table, sorted by name, ``ncols`` panels a row. Returns the figure.
    """
    import matplotlib.pyplot as plt

    from .tables import list_tables, load_table
    paths = list_tables(root, target="derivative")
    if not paths:
        raise ValueError(f"no derivative tables under {root or 'the project root'}")
    nrows = math.ceil(len(paths) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.6 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, paths):
        plot_error_curves(load_table(p), ax=ax, floor_grid=floor_grid, fontsize=6)
        ax.set_title(ax.get_title().split(":")[0], fontsize=10)
        ax.set_xlabel("y", fontsize=8)
    for ax in axes.flat[len(paths):]:
        ax.set_visible(False)
    fig.suptitle("|g~(y) - g(y)| per branch (relative where |g| > 1), with the information floors", y=1.0)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def plot_gradient_errors(x: np.ndarray, errors: Mapping[str, np.ndarray], floors: Mapping[str, float] | None = None,
                         title: str = "gradient error against autograd", path: str | os.PathLike | None = None,
                         ax=None):
    """End-to-end errors over x (one curve per label, e.g. per input dtype) against the floors.

    ``errors[label]`` is |grad_invact - grad_reference| at ``x`` (the caller computes both);
    ``floors`` maps dtypes to floors drawn as lines (see :func:`information_floors`). Returns the figure.
    """
    fig, ax = _axes(ax, (9, 4.5), path)
    x = np.asarray(x, dtype=np.float64)
    for (label, err), color in zip(errors.items(), itertools.cycle(_CURVE_COLORS)):
        err = np.asarray(err, dtype=np.float64)
        ax.plot(x, np.where(err > 0, err, np.nan), lw=0.6, color=color, label=label)   # exact zeros left out
    _hlines(ax, floors or {}, "information floor")
    ax.set_xlabel("x")
    ax.set_ylabel("|f'(x) - g~(y, code)|")
    ax.set_title(title)
    _finish(fig, ax, path, 8)
    return fig
