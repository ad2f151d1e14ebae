"""The table row the segment-index kernels (the AVX-512 and AVX2 kernels, act_triton.search) must choose for
each y and code, in torch: the class is the last whose code matches (the first where none does), the
row its first plus the count of its thresholds that y passes (`y > t` where strict, else `y >= t`);
the y to probe it at; random tables of classes for the search tests."""

import math

import torch

from invact import cpu_kernel

TINY = torch.finfo(torch.float32).tiny
POLY_ISAS = [isa for isa in cpu_kernel.POLY_ISAS if cpu_kernel.poly_library(isa) is not None]
"""The polynomial kernels (invact.cpu_kernel.poly_library) this machine runs: AVX-512's where ATen's
capability is AVX-512, and the AVX2 build there and on AVX2 CPUs (the tests parametrize over them; an
empty list skips)."""


def row_of(classes, thresholds, strict, y: torch.Tensor, codes: torch.Tensor, flushed: bool) -> torch.Tensor:
    """Each element's row (int64); a subnormal y compared as 0 where denormals are ``flushed``, as the
    kernel's compares read it."""
    yy = torch.where(y.abs() < TINY, torch.zeros_like(y), y) if flushed else y
    chosen = torch.zeros_like(codes)
    for c, (code, *_) in enumerate(classes):
        chosen = torch.where(codes == code, c, chosen)
    row = torch.zeros(y.shape, dtype=torch.int64)
    for c, (_, first, count, first_thr) in enumerate(classes):
        passed = torch.zeros(y.shape, dtype=torch.int64)
        for v, s in zip(thresholds[first_thr:first_thr + count - 1], strict[first_thr:first_thr + count - 1]):
            passed += ((yy > v) if s else (yy >= v)).to(torch.int64)
        row = torch.where(chosen == c, first + passed, row)
    return row


def around(values, extra=()) -> torch.Tensor:
    """float32 ``values``, then the float32 after and before each (where a row starts and ends), then
    ``extra``."""
    t = torch.tensor(list(values), dtype=torch.float32)
    near = [torch.nextafter(t, torch.full_like(t, v)) for v in (math.inf, -math.inf)]
    return torch.cat([t, *near, torch.tensor(list(extra), dtype=torch.float32)])


# thresholds and probes of the segment-search tests (test_segment_search, test_triton_search)
POOL = [-3e38, -1e10, -2.5, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 1.0, 1.0000001, 7.0, 1e20, 3e38]


def random_classes(rng, n_classes: int, most: int, pool=POOL):
    """(classes, thresholds, strict, rows) of a table, thresholds drawn from ``pool``: class c has
    `count` segments numbered from its first; rows are [tid, center, scale, c0_hi, c0_lo, c1] with
    c0_hi = the segment's number + 1."""
    classes, thresholds, strict, first = [], [], [], 0
    for _ in range(n_classes):
        count = rng.randint(1, most)
        # ascending; at equal thresholds `>=` before `>`, as a fitted table's are
        own = sorted((rng.choice(pool), rng.random() < 0.5) for _ in range(count - 1))
        classes.append((rng.randrange(16), first, count, len(thresholds)))
        thresholds += [v for v, _ in own]
        strict += [s for _, s in own]
        first += count
    rows = [[0.0, 0.0, 0.0, float(s + 1), 0.0, 0.0] for s in range(first)]
    return tuple(classes), tuple(thresholds), tuple(strict), rows


def search_probes(thresholds) -> torch.Tensor:
    """y at and beside every threshold and POOL value, at the smallest normals, subnormals, zeros, NaN."""
    return around(list(thresholds) + POOL, [TINY, -TINY, 1e-45, -1e-45, 1e-40, -1e-40, 0.0, -0.0, math.nan])


def table_edges(name: str) -> torch.Tensor:
    """float32 y at and beside every y threshold of activation ``name`` (its rows' ends), at zeros,
    subnormals, the largest floats, infinities and NaN."""
    from invact import ops
    big = torch.finfo(torch.float32).max
    return around(ops.table_constants(name, torch.float32, "cpu").y_threshold_values,
                  [0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, big, -big, math.inf, -math.inf, math.nan])
