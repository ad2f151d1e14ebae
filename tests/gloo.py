"""Two-process tests on gloo (CPU): the launcher test_dtensor.py and test_patch_fsdp.py share. Apart from
helpers.py so that the workers, which import it, do not import the fitter."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch


def spawn_gloo(tmp_path: Path, case, *args, world: int = 2) -> None:
    """``case(rank, *args)`` in ``world`` processes on gloo (torch.multiprocessing.spawn, rendezvous through
    a FileStore in ``tmp_path``: no ports; loopback). An error in either raises here with its traceback and
    ends the others (gloo's 60 s timeout ends a rank left waiting). Both ranks pass a barrier before tearing
    gloo down: a rank that destroyed its group while its peer still talked aborted at times at exit
    ("terminate called without an active exception")."""
    torch.multiprocessing.spawn(_gloo_entry, args=(str(tmp_path / "store"), world, case, args), nprocs=world,
                                join=True)


def _gloo_entry(rank: int, store: str, world: int, case, args: tuple) -> None:
    import torch.distributed as dist
    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")   # loopback: no dependence on the host's name
    torch.set_num_threads(1)                      # the workers share the machine
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    case(rank, *args)
    dist.barrier()
    dist.destroy_process_group()
