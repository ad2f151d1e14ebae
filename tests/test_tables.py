"""Table files: deterministic dump, validation on load, atomic and locked writes."""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import signal

import numpy as np
import pytest

from invact.fitting import tables
from invact.fitting.errors import InputError, TableError


def sample_table(name: str = "sigmoid", note: float = 0.0) -> dict:
    """A small valid derivative table (sigmoid, one exact segment and one poly segment)."""
    return {
        "format": "invact-table", "format_version": 1, "invact_version": "0.1.0", "name": name,
        "formula": "1/(1 + exp(-x))", "params": {}, "param_generic": False, "param_domain": [],
        "torch_forward": "torch.sigmoid(x)", "nan_gradients": {}, "target": "derivative", "tolerance": 5e-08,
        "n_branches": 1, "n_codes": 1, "code_bits": 0,
        "forward_code": {"x_breaks": [], "codes": [0]},
        "branches": [{"index": 0, "code": 0, "x_range": [float("-inf"), float("inf")],
                      "y_range": [0.0, 1.0], "direction": "increasing", "route": "exact",
                      "lower_end": "log", "upper_end": "log", "singularities": [], "tails": []}],
        "code_classes": [{"code": 0, "y_breaks": [{"value": "0.5", "side": "right"}], "segments": [
            {"kind": "exact", "expr": "y*(1 - y)", "y_range": [0.0, 0.5], "branch": 0},
            {"kind": "poly", "y_range": [0.5, 1.0], "branch": 0, "transform": {"kind": "identity"},
             "center": 0.75, "scale": 4.0, "coeffs": [0.1875, -0.125, -0.0625], "c0_lo": note,
             "error": 0.0}]}],
        "certificate": {"method": "arb-taylor2", "approx_error": 0.0, "float32_eval_error": 1.2e-08,
                        "checks": ["rigorous"], "branches": []},
    }


def test_round_trip_and_exact_floats(tmp_path):
    table = sample_table()
    table["code_classes"][0]["segments"][1]["c0_lo"] = 1.1754944e-38   # float32 values survive exactly
    path = tables.write_table(table, tmp_path / "sigmoid.json")
    loaded = tables.load_table(path)
    assert loaded["branches"][0]["x_range"] == ["-inf", "inf"]          # documented string form
    assert [tables.as_float(v) for v in loaded["branches"][0]["x_range"]] == [float("-inf"), float("inf")]
    assert loaded["code_classes"][0]["segments"][1]["c0_lo"] == 1.1754944e-38
    assert tables.dump_table(loaded) == path.read_text()                 # load -> dump is the identity
    assert len(loaded["sha256"]) == 64


def test_dump_is_deterministic_and_ordered():
    table = sample_table()
    shuffled = dict(reversed(list(copy.deepcopy(table).items())))
    shuffled["branches"][0] = dict(sorted(shuffled["branches"][0].items()))
    text = tables.dump_table(table)
    assert tables.dump_table(shuffled) == text
    keys = list(json.loads(text))
    assert keys[:3] == ["format", "format_version", "invact_version"] and keys[-1] == "sha256"
    assert tables.dump_table(sample_table(note=1e-9)) != text
    numpy_table = sample_table()                      # numpy values dump like their Python values
    seg = numpy_table["code_classes"][0]["segments"][1]
    seg["coeffs"], seg["center"], seg["branch"] = np.array(seg["coeffs"], np.float32), np.float32(0.75), np.int64(0)
    assert tables.dump_table(numpy_table) == text


def test_dump_refuses_nan_and_odd_types():
    table = sample_table()
    table["tolerance"] = float("nan")
    with pytest.raises(ValueError, match="tolerance is NaN"):
        tables.dump_table(table)
    table["tolerance"] = {1, 2}
    with pytest.raises(TypeError, match="tolerance has type set"):
        tables.dump_table(table)


@pytest.fixture
def written(tmp_path):
    return tables.write_table(sample_table(), tmp_path / "sigmoid.json")


def _edit(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_text(p.read_text()[:200]), "not valid JSON"),
    (lambda p: p.write_text(""), "not valid JSON"),
    (lambda p: _edit(p, lambda d: d["code_classes"][0]["segments"][1]["coeffs"].__setitem__(0, 0.19)),
     "does not match its sha256"),
    (lambda p: _edit(p, lambda d: d.__setitem__("format_version", 2)), "format_version 2"),
    (lambda p: _edit(p, lambda d: d.__setitem__("format", "other")), "not an invact table"),
    (lambda p: _edit(p, lambda d: d.pop("certificate")), "lacks the key 'certificate'"),
    (lambda p: _edit(p, lambda d: d.__setitem__("n_codes", "1")), "'n_codes' of type str"),
    (lambda p: p.write_text("[1, 2]"), "expected an object"),
    (lambda p: p.write_text('{"format": NaN}'), "not valid JSON"),
    (lambda p: p.unlink(), "does not exist"),
])
def test_load_rejects_damaged_files(written, damage, message):
    damage(written)
    with pytest.raises(TableError, match=message) as info:
        tables.load_table(written)
    text = str(info.value)
    assert str(written) in text and "invact fit sigmoid" in text
    assert isinstance(info.value, InputError)


def test_load_rejects_inconsistent_but_hashed_table(tmp_path):
    table = sample_table()
    table["code_bits"] = 1                         # a writer bug: the hash is right, the content not
    path = tables.write_table(table, tmp_path / "sigmoid.json")
    with pytest.raises(TableError, match="code_bits 1, expected 0"):
        tables.load_table(path)
    path = tables.write_table(sample_table(), tmp_path / "tanh.json")
    with pytest.raises(TableError, match="file name says 'tanh'"):
        tables.load_table(path)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("nan_gradients"), "lacks the key 'nan_gradients'"),        # a table from before the field
    (lambda d: d.__setitem__("nan_gradients", []), "'nan_gradients' of type list"),
    (lambda d: d.__setitem__("nan_gradients", {"zero": [1.0]}), "keys among nan, -inf, inf"),
    (lambda d: d.__setitem__("nan_gradients", {"nan": []}), r"nan_gradients\['nan'\] that is not a non-empty"),
    (lambda d: d.__setitem__("nan_gradients", {"nan": ["1"]}), r"nan_gradients\['nan'\] that is not a non-empty"),
    (lambda d: d.__setitem__("nan_gradients", {"-inf": [True]}), r"nan_gradients\['-inf'\] that is not"),
    (lambda d: d.update(torch_forward=None, nan_gradients={"nan": [1.0]}), "without a torch_forward"),
])
def test_load_rejects_malformed_nan_gradients(tmp_path, edit, message):
    """nan_gradients (PyTorch's gradients where y is NaN) reach generated code as numbers: a hashed
    table holding anything else, or none (written before the field), is refused with the refit."""
    table = sample_table()
    edit(table)
    path = tables.write_table(table, tmp_path / "sigmoid.json")
    with pytest.raises(TableError, match=message) as info:
        tables.load_table(path)
    assert "invact fit" in str(info.value)
    table = sample_table()
    table["nan_gradients"] = {"-inf": [0.0, "inf"], "nan": [1.0]}                # numbers and "inf": accepted
    assert tables.load_table(tables.write_table(table, path))["nan_gradients"] == table["nan_gradients"]


def test_regenerate_hint_for_user_formulas(tmp_path):
    """An intact table that is wrong (a writer bug) proposes its own formula; a table changed after
    it was written does not (its formula is untrusted): it says so and names the file."""
    table = sample_table("mine")
    table["formula"] = "x/(1 + Abs(x))"
    table["code_bits"] = 1
    path = tables.write_table(table, tmp_path / "mine.json")
    with pytest.raises(TableError, match=r"invact fit 'x/\(1 \+ Abs\(x\)\)' --name mine"):
        tables.load_table(path)
    table["code_bits"] = 0
    tables.write_table(table, path)
    path.write_text(path.read_text().replace("0.1875", "0.1876"))
    with pytest.raises(TableError) as info:
        tables.load_table(path)
    text = str(info.value)
    assert str(path) in text and "changed after invact wrote it" in text, text
    assert "Abs" not in text and "invact fit FORMULA --name mine" in text, text


def test_paths(tmp_path, monkeypatch):
    assert tables.table_path("gelu", root=tmp_path) == tmp_path / "generated" / "tables" / "gelu.json"
    assert tables.table_path("gelu", "inverse", tmp_path).name == "gelu.inverse.json"
    assert tables.name_of("a/gelu.inverse.json") == ("gelu", "inverse")
    with pytest.raises(TableError, match="Python identifier"):
        tables.table_path("../evil", root=tmp_path)
    with pytest.raises(TableError, match="target must be one of"):
        tables.table_path("gelu", "second", tmp_path)
    monkeypatch.setenv("INVACT_ROOT", str(tmp_path))
    assert tables.tables_dir() == tmp_path / "generated" / "tables"
    monkeypatch.delenv("INVACT_ROOT")
    assert (tables.tables_dir().parent / "__init__.py").is_file()      # the invact.generated package
    assert tables.list_tables(tmp_path) == []
    for n in ("tanh", "gelu"):
        tables.write_table(sample_table(n), tables.table_path(n, root=tmp_path))
    (tables.tables_dir(tmp_path) / "notes.txt").write_text("x")
    assert [p.name for p in tables.list_tables(tmp_path)] == ["gelu.json", "tanh.json"]
    assert sorted(os.listdir(tables.tables_dir(tmp_path))) == ["gelu.json", "notes.txt", "tanh.json"]


def _writer(path: str, note: float, rounds: int) -> None:
    for _ in range(rounds):
        tables.write_table(sample_table(note=note), path)


@pytest.mark.slow
def test_concurrent_writers_leave_one_valid_table(tmp_path):
    """Two processes rewrite one table; a reader never sees a partial file; no temp files remain."""
    path = tmp_path / "sigmoid.json"
    ctx = mp.get_context("fork")      # cheap: the children only write JSON (no torch, no threads)
    procs = [ctx.Process(target=_writer, args=(str(path), note, 200)) for note in (1e-9, 2e-9)]
    for p in procs:
        p.start()
    seen = set()
    while any(p.is_alive() for p in procs):
        if path.exists():
            seen.add(tables.load_table(path)["code_classes"][0]["segments"][1]["c0_lo"])
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert tables.load_table(path)["code_classes"][0]["segments"][1]["c0_lo"] in (1e-9, 2e-9)
    assert seen <= {1e-9, 2e-9}
    assert os.listdir(tmp_path) == ["sigmoid.json"]


def _interrupted_writer(path: str) -> None:
    """Write a table, but receive SIGINT just before the temp file replaces the table."""
    def interrupt(*args):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT was not delivered")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tables.os.replace = interrupt
    try:
        tables.write_table(sample_table(note=1e-9), path)
    except KeyboardInterrupt:
        os._exit(130)
    os._exit(0)


def test_interrupted_writer_leaves_no_temp_file(tmp_path):
    """A writer interrupted by SIGINT before os.replace removes its temp file; the old table stays."""
    path = tables.write_table(sample_table(), tmp_path / "sigmoid.json")
    before = path.read_bytes()
    proc = mp.get_context("fork").Process(target=_interrupted_writer, args=(str(path),))
    proc.start()
    proc.join()
    assert proc.exitcode == 130
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["sigmoid.json"]
