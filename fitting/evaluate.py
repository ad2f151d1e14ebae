"""Evaluate a table the way generated code does: the float32 scheme of docs/table-format.md in numpy.

``dtype=np.float32`` emulates the runtime bit for bit (no FMA); ``np.float64`` gives the table's
value in (nearly) real arithmetic, for approximation errors and plots. The evaluation itself is each
segment kind's (:mod:`.model`); these functions accept a table's JSON parts or the model's objects.
"""

from __future__ import annotations

import numpy as np

from .model import CodeClass, Segment, horner, number, segment_index

__all__ = ["eval_code_class", "eval_segment", "horner", "segment_index", "number"]


def eval_segment(seg: Segment | dict, y: np.ndarray, params: dict | None = None) -> np.ndarray:
    """g~(y) of one segment (a JSON segment or a :class:`.model.Segment`)."""
    return (seg if isinstance(seg, Segment) else Segment.from_json(seg)).evaluate(y, params)


def eval_code_class(cc: CodeClass | dict, y: np.ndarray, params: dict | None = None) -> np.ndarray:
    """g~(y) for one code class; y's dtype (float32 or float64) is the arithmetic used."""
    return (cc if isinstance(cc, CodeClass) else CodeClass.from_json(cc)).evaluate(y, params)
