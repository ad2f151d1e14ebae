"""The figures of the GPUs invact's estimates are priced on (benchmarks/ptx_estimate.py), by device name.

    python benchmarks/gpu_devices.py      # prints the current CUDA device's key (h200 without one)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Gpu", "GPUS", "DEFAULT", "gpu_key", "current_key"]


@dataclass(frozen=True)
class Gpu:
    """What the estimate needs of a GPU: its name, streaming multiprocessors, boost clock, HBM bandwidth."""

    name: str
    sms: int
    clock_hz: float
    hbm_bytes_s: float


# NVIDIA's data sheets (SXM boards unless named)
GPUS = {"h200": Gpu("H200 SXM", 132, 1.98e9, 4.8e12),
        "h100": Gpu("H100 SXM", 132, 1.98e9, 3.35e12),
        "h100-pcie": Gpu("H100 PCIe", 114, 1.755e9, 2.0e12)}
DEFAULT = "h200"


def gpu_key(device_name: str) -> str:
    """The :data:`GPUS` key of a CUDA device named ``device_name`` (torch.cuda.get_device_name), or
    :data:`DEFAULT` where it is none of them."""
    name = device_name.upper()
    if "H100" in name:
        return "h100-pcie" if "PCIE" in name else "h100"
    return DEFAULT


def current_key() -> str:
    """The key of the current CUDA device, :data:`DEFAULT` without one."""
    import torch
    return gpu_key(torch.cuda.get_device_name()) if torch.cuda.is_available() else DEFAULT


if __name__ == "__main__":
    print(current_key())
