"""A C kernel's cache key hashes every header of csrc/ the compiler reads for it
(invact.kernel_cache.headers_of), so that an edited header always means a new build, never a stale
cached .so. The compiler's own dependency list (-MM, the build's flags) is the judge; the key may
hold more (a header behind an #if this build does not take), never less."""

import subprocess
from pathlib import Path

import pytest

from invact import cpu_kernel, kernel_cache, norm_cpu, registry, table_c

COMPILER = cpu_kernel._compiler()
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C compiler")
CSRC = cpu_kernel.SOURCE.parent
ISA = {"AVX512": cpu_kernel.ISA_FLAGS["AVX512"], "AVX2": (*cpu_kernel.ISA_FLAGS["AVX2"], "-mfma"), "none": ()}


def _read_by_compiler(source: Path, flags: tuple[str, ...]) -> set[Path]:
    """The headers of csrc/ that the compiler reads for ``source`` built with ``flags``."""
    out = subprocess.run([COMPILER, "-MM", *flags, f"-I{CSRC}", str(source)], capture_output=True, text=True,
                         check=True).stdout
    names = out.replace("\\\n", " ").split(":", 1)[1].split()
    return {Path(n).resolve() for n in names if Path(n).resolve().parent == CSRC.resolve()} - {source.resolve()}


def _keyed(headers) -> set[Path]:
    return {Path(h).resolve() for h in headers}


@needs_compiler
@pytest.mark.parametrize("isa", sorted(ISA))
@pytest.mark.parametrize("source, headers", [(cpu_kernel.SOURCE, "HEADERS"), (cpu_kernel.AVX2_SOURCE, "AVX2_HEADERS"),
                                             (norm_cpu.SOURCE, "NORM")],
                         ids=["cpu_kernels", "cpu_avx2", "norm_kernels"])
def test_the_kernels_keys_hash_every_header_read(source, headers, isa):
    keyed = norm_cpu.HEADERS if headers == "NORM" else getattr(cpu_kernel, headers)
    read = _read_by_compiler(source, ISA[isa])
    assert read, "the compiler read no csrc/ header: the check would be empty"
    assert read <= _keyed(keyed), f"read but not in the key: {sorted(p.name for p in read - _keyed(keyed))}"


@needs_compiler
@pytest.mark.parametrize("fma", [False, True])
@pytest.mark.parametrize("name", registry.names())
def test_a_tables_key_hashes_every_header_read(name, fma):
    source = table_c.source(registry.module(name))
    flags = tuple(f for f in table_c._flags(fma) if f not in ("-shared", "-fPIC"))
    read = _read_by_compiler(source, flags)
    keyed = _keyed(kernel_cache.headers_of(source.read_bytes(), CSRC))
    assert read and read <= keyed, f"read but not in the key: {sorted(p.name for p in read - keyed)}"


def test_headers_of_follows_includes_and_refuses_a_missing_one(tmp_path):
    (tmp_path / "a.h").write_text('#include "b.h"\n#include <stdio.h>\n')
    (tmp_path / "b.h").write_text('  #  include "a.h"\n')                 # a cycle ends
    (tmp_path / "c.h").write_text("")
    assert kernel_cache.headers_of(b'#include "a.h"\n', tmp_path) == (tmp_path / "a.h", tmp_path / "b.h")
    with pytest.raises(ValueError, match='"d.h"'):
        kernel_cache.headers_of(b'#include "c.h"\n#include "d.h"\n', tmp_path)
