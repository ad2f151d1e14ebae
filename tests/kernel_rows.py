"""The table row the AVX-512 kernel (invact.cpu_kernel) must choose for each y and code, in torch:
the class is the last whose code matches (the first where none does), the row its first plus the
count of its thresholds that y passes (`y > t` where strict, else `y >= t`); and the y to probe it at."""

import math

import torch

TINY = torch.finfo(torch.float32).tiny


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
