"""The ``invact`` command: list, fit, certify, show, plot and generate activation tables.

Exit status: 0 success, 2 bad usage or input (argparse errors, :class:`InputError`, a --root or
$INVACT_ROOT that is not a project tree, output that cannot be written), 1 internal failure,
128+signal when interrupted (SIGINT 130, SIGTERM 143). Tables and modules are staged, then renamed
into place under the tables folder's lock, with SIGINT/SIGTERM deferred, so an interrupted or failed
command leaves ``generated/`` as it was (or completely updated, if the signal came during that last
step); after a SIGKILL between the table and its code, the runtime refuses the code (its
TABLE_SHA256 differs) and names ``invact generate``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..common.after_import import cancel as cancel_after_import
from ..common.params import DEFAULT_TOLERANCE
from . import tables
from .errors import InputError, SpecError, WriteError
from .interrupts import raise_interrupted, signals_deferred
from .settings import FP32_SAMPLES, MAX_FP32_SAMPLES, MAX_TOLERANCE, MIN_TOLERANCE, RATIONAL_MODES, tolerance_text

if TYPE_CHECKING:
    from .formulas import ActivationSpec

__all__ = ["main"]

PROG = "invact"


# --------------------------------------------------------------------------------------------
# output helpers

def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def _fmt(v: float | str | None) -> str:
    if v is None:
        return "-"
    v = tables.as_float(v)
    return f"{v:.4g}" if math.isfinite(v) and (v == 0 or 1e-3 <= abs(v) < 1e5) else f"{v:.3g}"


def _errors(cert: dict) -> str:
    """A certificate's figures as docs/table-format.md (CERT) defines them: the approximation error is a
    proved bound (real arithmetic); the float32 error is the largest the emulated scheme showed at the y
    checked, a bound for every float32 y only where every one was checked (--exhaustive), else a sampled
    figure that another float32 y can exceed."""
    checks = cert.get("checks", [])
    if "fp32-exhaustive" in checks:
        seen = "the largest at every bf16, fp16 and float32 y"
    else:
        n = next((c.removeprefix("fp32-stratified-") for c in checks if c.startswith("fp32-stratified-")), "?")
        n = f"2^{int(n).bit_length() - 1}" if n.isdigit() and int(n) & (int(n) - 1) == 0 else n
        seen = f"sampled: the largest at every bf16 and fp16 y and {n} stratified float32 y a branch, not a bound"
    return (f"approx error {_fmt(cert.get('approx_error'))} (proved bound), float32 error "
            f"{_fmt(cert.get('float32_eval_error'))} ({seen})")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class ProgressBar:
    """``progress(fraction, label)`` callback drawing a bar with elapsed and remaining time on stderr.

    On a terminal the bar redraws in place; otherwise a line is printed at most every 2 seconds.
    """

    def __init__(self, stream=None, width: int = 28):
        self.stream = stream or sys.stderr
        self.width = width
        self.start = self.last = time.monotonic()
        self.tty = self.stream.isatty()

    def __call__(self, frac: float, label: str) -> None:
        now = time.monotonic()
        if not self.tty and now - self.last < 2.0 and frac < 1.0:
            return
        self.last = now
        frac = min(max(frac, 0.0), 1.0)
        elapsed = now - self.start
        left = f"~{_clock(elapsed * (1 - frac) / frac)} left" if frac > 0.02 else "estimating time left"
        fill = int(frac * self.width)
        line = f"[{'#' * fill}{'.' * (self.width - fill)}] {frac:4.0%}  {_clock(elapsed)} elapsed, {left}  {label}"
        if self.tty:
            self.stream.write("\r" + line[:150].ljust(150))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _logger() -> Callable[[str], None]:
    start = time.monotonic()
    return lambda msg: _say(f"[{time.monotonic() - start:6.1f}s] {msg}")


# --------------------------------------------------------------------------------------------
# committing tables: atomic write + code generation, signals deferred

def _commit(table: dict, path: Path, root: Path | None, generate: bool) -> list[Path]:
    """Write ``table`` and regenerate the code, under the tables folder's lock: the code is computed
    first (a generation failure writes nothing), then the table, then the modules (each carries the
    table's sha256: a process killed in between leaves code the runtime refuses, with the fix)."""
    with signals_deferred(), _writing():
        if not generate:
            tables.write_table(table, path)
            return []
        from .codegen import generate_all
        return generate_all(root, pending={path: table}, note=_say)


@contextlib.contextmanager
def _writing() -> Iterator[None]:
    """An OSError while writing tables or code (which leaves them as they were) as a :class:`WriteError`."""
    try:
        yield
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise WriteError(f"cannot write{where} ({exc.strerror or exc}); nothing was changed; "
                         f"{tables.WRITE_FIX}") from None


def _check_writable(path: Path, root: Path | None, generate: bool) -> None:
    """The folders a fit or certification of ``path`` writes take files: checked before the long work."""
    folders = [path.parent] + ([tables.project_root(root) / "generated"] if generate else [])
    tables.check_writable(*folders)


def _check_tree(root: Path | None, replaced: Path | None = None) -> None:
    """Every table under ``root`` must load before a long fit or certification whose code generation
    would read them all (``replaced``, the table being rewritten, may be broken)."""
    from .codegen import check_table_printable
    for path in tables.list_tables(root):
        if replaced is None or path.resolve() != replaced.resolve():
            check_table_printable(path, tables.load_table(path))


# --------------------------------------------------------------------------------------------
# commands

def _resolve(args) -> tuple[Path, dict]:
    """The table named by ``args.name`` (a name, or a path ending in .json) and its content."""
    if args.name.endswith(".json"):
        path = Path(args.name)
    else:
        path = tables.table_path(args.name, args.target, args.root)
    return path, tables.load_table(path)


def _pieces(table: dict) -> str:
    """The fitted pieces and their degrees, as README's certified-errors table gives them: ``12 (deg 8)``,
    ``14 (deg 6-8)``; constant tails and closed forms are no pieces (``exact`` when nothing is fitted)."""
    from .model import Segment
    fitted = [seg for cc in table["code_classes"] for s in cc["segments"] if (seg := Segment.from_json(s)).fitted]
    if not fitted:
        return "exact"
    degrees = sorted({seg.degree for seg in fitted})
    rational = sum(seg.den_degree > 0 for seg in fitted)
    span = f"{degrees[0]}" + (f"-{degrees[-1]}" if len(degrees) > 1 else "")
    return f"{len(fitted)} (deg {span}" + (f", {rational} rational)" if rational else ")")


def cmd_list(args) -> int:
    from .formulas import BUILTINS
    paths = {tables.name_of(p): p for p in tables.list_tables(args.root)}
    root_opt = tables.root_option(tables.project_root(args.root))
    names = sorted(set(BUILTINS) | {n for n, _ in paths})
    rows = [("name", "target", "branches", "codes/bits", "pieces", "approx err", "fp32 err", "status")]
    for name in names:
        keys = [k for k in paths if k[0] == name] or [(name, "derivative")]
        for key in sorted(keys):
            kind = "built-in" if name in BUILTINS else "formula"
            if key not in paths:
                rows.append((name, key[1], "-", "-", "-", "-", "-", f"{kind}, not fitted: invact fit {name}{root_opt}"))
                continue
            try:
                t = tables.load_table(paths[key])
            except InputError as exc:
                rows.append((name, key[1], "-", "-", "-", "-", "-", f"invalid table ({exc})"))
                continue
            cert = t["certificate"]
            rows.append((name, key[1], str(t["n_branches"]), f"{t['n_codes']}/{t['code_bits']}",
                         str(_pieces(t)), _fmt(cert.get("approx_error")), _fmt(cert.get("float32_eval_error")),
                         f"{kind}, certified: {', '.join(cert.get('checks', []))}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
              + "  " + r[-1])
    return 0


def _formula_table(args) -> dict | None:
    """The table of the formula that ``args.activation`` names (not a built-in), under --root, if any:
    `invact fit NAME --param K=V` refits it from its own formula, the given values replacing the stored
    ones (one table holds one parameter set; --name NEW fits a new table and keeps this one)."""
    from .formulas import BUILTINS
    name = args.activation
    if name in BUILTINS or not name.isidentifier() or name == "x":
        return None
    path = next((p for t in (args.target, *tables.TARGETS)
                 if (p := tables.table_path(name, t, args.root)).is_file()), None)
    return None if path is None else tables.load_table(path)


def _existing(path: Path) -> dict | None:
    """The table at ``path``, if there is one that loads."""
    try:
        return tables.load_table(path) if path.is_file() else None
    except InputError:
        return None


def _check_builtin_params(spec: ActivationSpec, table: dict | None) -> None:
    """A built-in's table keeps PyTorch's defaults (the runtime and `invact.patch` read them from it):
    other parameters are refused, naming the run-time argument (where ``table``, its table on disk, is exact
    in them and serves every value) and the fit under a new name."""
    from .formulas import BUILTINS
    defaults = BUILTINS[spec.name].params if spec.name in BUILTINS else spec.params
    changed = {k: v for k, v in spec.params.items() if defaults.get(k) != v}
    if not changed:
        return
    given = " ".join(f"--param {k}={v:g}" for k, v in changed.items())
    at_run_time = "" if not (table and table["param_generic"]) else (
        f"its table serves every value of {', '.join(table['params'])}, so pass them at run time, no fit "
        f"needed (invact.activation({spec.name!r}, {', '.join(f'{k}={v!r}' for k, v in changed.items())})); or ")
    raise SpecError(f"{spec.name!r} is a built-in: its table keeps PyTorch's defaults {dict(defaults)}; "
                    f"{at_run_time}fit its formula with these values as a table of its own: "
                    f"`invact fit {spec.name} {given} --name NEW`")


def _check_same_formula(spec: ActivationSpec, path: Path, table: dict | None) -> None:
    """A fit must not silently replace ``table`` (at ``path``), of another formula, under its name (--replace does)."""
    if table is not None and table["formula"] != spec.formula():
        raise SpecError(f"table {spec.name!r} ({path}) holds another formula, {table['formula']!r}; choose "
                        f"another --name, or add --replace to replace it with {spec.formula()!r}")


def _check_printable(spec: ActivationSpec, formula: str) -> None:
    """Refuse before the fit a formula whose code cannot be generated; a refusal of the formula
    itself (the branch analysis's: sin(x) has infinitely many branches) is given first."""
    from .codegen import check_printable
    try:
        check_printable(spec.expr, f"formula {formula!r}")
    except SpecError:
        with signals_deferred():
            from .branches import analyze
        analyze(spec)
        raise


def cmd_fit(args) -> int:
    from .expressions import size_guard
    args.activation = args.activation.strip()   # main() may have put a space before a leading minus
    start = time.monotonic()
    # a huge formula hits the recursion limit anywhere in its own work; not in the checks of other tables
    with size_guard("formula", args.activation):
        spec, path, generate = _fit_spec(args)
    _check_writable(path, args.root, generate)
    if generate:
        _check_tree(args.root, path)
    with size_guard("formula", args.activation):
        table = _build(spec, args)
    generated = _commit(table, path, args.root, generate)
    cert = table["certificate"]
    print(f"wrote {path}: {table['n_branches']} branches, {table['n_codes']} codes ({table['code_bits']} bits), "
          f"pieces {_pieces(table)}, {_errors(cert)} ({time.monotonic() - start:.1f} s)")
    if generated:
        print(f"regenerated {len(generated)} files under {generated[0].parent}")
    return 0


def _fit_spec(args) -> tuple[ActivationSpec, Path, bool]:
    """(the activation, its table's path, whether its code is generated) for `invact fit`, its formula,
    name and parameters checked; nothing is written."""
    from .formulas import BUILTINS, get_spec
    seen: dict[str, float] = {}
    for key, value in args.param:
        if key in seen:
            raise SpecError(f"--param {key} is given twice ({key}={seen[key]:g} and {key}={value:g}); "
                            "give each parameter once")
        seen[key] = value
    table = _formula_table(args)
    formula = table["formula"] if table else args.activation
    name = args.name or (args.activation if table else None)
    spec = get_spec(formula, name, {**(table["params"] if table else {}), **dict(args.param)})
    if args.activation not in BUILTINS and name is None:
        raise SpecError(f"formula {args.activation!r} needs a name: add --name NAME (a Python identifier)")
    name = name or spec.name
    if name in BUILTINS and name != args.activation:
        raise SpecError(f"--name {name!r} is a built-in activation; choose another name for this formula")
    spec = dataclasses.replace(spec, name=name)
    path = tables.table_path(name, args.target, args.root)
    existing = _existing(path)
    _check_builtin_params(spec, existing)
    if not args.replace:
        _check_same_formula(spec, path, existing)
    if args.target == "derivative":          # its table's code is generated, now or by `invact generate`
        _check_printable(spec, formula)
    return spec, path, args.target == "derivative" and not args.generate_off


def _build(spec: ActivationSpec, args) -> dict:
    """The fitted and certified table of ``spec`` with the options of `invact fit`; nothing is written."""
    with signals_deferred():                            # scipy's pybind11 modules: fitting/interrupts.py
        from .pipeline import build_table
    return build_table(spec, target=args.target, tolerance=args.tolerance,
                       fp32_samples=args.fp32_samples, progress=_logger(), rationals=args.rationals)


def cmd_certify(args) -> int:
    with signals_deferred():
        from .certify import certify_table
    path, table = _resolve(args)
    generate = table["target"] == "derivative" and not args.generate_off
    _check_writable(path, tables.root_of(path) or args.root, generate)
    if generate:
        _check_tree(tables.root_of(path) or args.root, path)
    bar = ProgressBar()
    try:
        table["certificate"] = certify_table(table, exhaustive=args.exhaustive,
                                             fp32_samples=args.fp32_samples, progress=bar)
    finally:
        bar.close()
    _commit(table, path, tables.root_of(path) or args.root, generate)
    cert = table["certificate"]
    print(f"certified {path}: {_errors(cert)}; checks {', '.join(cert['checks'])}")
    return 0


def _range(r) -> str:
    return f"[{_fmt(r[0])}, {_fmt(r[1])}]"


def cmd_show(args) -> int:
    path, t = _resolve(args)
    out = [f"{t['name']}  ({path})",
           f"  formula        {t['formula']}",
           f"  params         {t['params'] or '-'}" + (" (generic)" if t["param_generic"] else ""),
           f"  param domain   {', '.join(t['param_domain']) or '-'}",
           f"  torch forward  {t['torch_forward'] or '-'}",
           f"  target         {t['target']}, tolerance {_fmt(t['tolerance'])}",
           f"  codes          {t['n_codes']} ({t['code_bits']} bits), {t['n_branches']} monotone branches, "
           f"x breaks {[b['value'] + ' (' + b['side'] + ')' for b in t['forward_code']['x_breaks']] or '-'}",
           "  branches"]
    for b in t["branches"]:
        out.append(f"    {b['index']}: code {b['code']}, x {_range(b['x_range'])} -> y {_range(b['y_range'])}, "
                   f"{b['direction']}, route {b.get('route', '-')}, ends {b['lower_end']}/{b['upper_end']}")
        out += [f"       singularity: {s}" for s in b.get("singularities", [])]
        out += [f"       tail: y {_range(tl['y_range']) if 'y_range' in tl else tl} -> {tl.get('value')}"
                for tl in b.get("tails", [])]
    with signals_deferred():
        from .branches import END_KINDS
    kinds = sorted({b[k] for b in t["branches"] for k in ("lower_end", "upper_end")} & set(END_KINDS))
    out += ["  end kinds"] + [f"    {k}: {END_KINDS[k]}" for k in kinds]
    out.append("  pieces")
    for cc in t["code_classes"]:
        out.append(f"    code {cc['code']}: {len(cc['segments'])} segments")
        for s in cc["segments"]:
            out.append(f"      y {_range(s['y_range'])}  branch {s['branch']}  {_describe(s)}")
    c = t["certificate"]
    out.append(f"  certificate    {c.get('method')}: {_errors(c)}; with FMA {_fmt(c.get('float32_fma_eval_error'))}; "
               f"checks {', '.join(c.get('checks', []))}")
    for b in c.get("branches", []):
        out.append(f"    branch {b['index']}: approx {_fmt(b.get('approx_error'))}, bf16 {_fmt(b.get('bf16_eval_error'))}, "
                   f"fp16 {_fmt(b.get('fp16_eval_error'))}, fp32 {_fmt(b.get('fp32_eval_error'))} "
                   f"({'exhaustive' if b.get('fp32_exhaustive') else str(b.get('fp32_samples')) + ' samples'}); "
                   f"with FMA bf16 {_fmt(b.get('bf16_fma_eval_error'))}, fp16 {_fmt(b.get('fp16_fma_eval_error'))}, "
                   f"fp32 {_fmt(b.get('fp32_fma_eval_error'))}")
    print("\n".join(out))
    return 0


def _describe(seg: dict) -> str:
    from .model import Segment
    return Segment.from_json(seg).describe(_fmt)


def _check_output(path: Path) -> None:
    """The plot's file must be writable with a format matplotlib writes: checked before any work."""
    with signals_deferred():                            # matplotlib's pybind11 modules
        from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise InputError(f"-o/--output {path}: unsupported image format {path.suffix or '(no suffix)'!r}; "
                         f"use one of {', '.join('.' + f for f in sorted(formats))}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"-o/--output {path}: folder {folder} does not exist")
    if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"-o/--output {path}: cannot write there (a folder, or no write permission)")
    with _output_errors(path):
        tables.probe_folder(folder)


@contextlib.contextmanager
def _output_errors(path: Path) -> Iterator[None]:
    """An OSError while writing the plot's file as an :class:`InputError` naming -o/--output."""
    try:
        yield
    except OSError as exc:
        raise InputError(f"-o/--output {path}: cannot write there ({exc.strerror or exc}); "
                         "give a file in a folder you can write") from None


def cmd_plot(args) -> int:
    from .plot import plot_error_curves
    _check_output(args.output)
    _, table = _resolve(args)
    with _output_errors(args.output):
        plot_error_curves(table, args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_generate(args) -> int:
    with signals_deferred(), _writing():
        from .codegen import generate_all
        paths = generate_all(args.root, note=_say)
    print(f"generated {len(paths)} files under {tables.project_root(args.root) / 'generated'}")
    return 0


# --------------------------------------------------------------------------------------------
# argument parsing

def _param(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. alpha=0.5), got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"value of {key} must be a real number, got {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"value of {key} must be finite, got {value!r}")
    return key, number


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _root(text: str) -> Path:
    """--root DIR: an empty DIR is refused (Path('') would silently be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a folder (the current one is '.'), or leave --root out "
                                         f"for ${tables.ROOT_ENV} or the installed package's tree")
    return Path(text)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("invact")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


def _common(suffix: str) -> argparse.ArgumentParser:
    """--root and --debug, accepted before and after the command. A subcommand's parser would reset
    a value given before it, so its copies store under other names that :func:`_merge` folds back."""
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--root", type=_root, dest="root" + suffix, metavar="DIR",
                        help="project tree holding generated/ (default: $INVACT_ROOT, else the installed "
                        "invact package)")
    common.add_argument("--debug", action="store_true", dest="debug" + suffix,
                        help="print the full traceback on internal errors")
    return common


def _merge(args: argparse.Namespace) -> argparse.Namespace:
    for name in ("root", "debug"):
        late = getattr(args, name + "_sub", None)
        if late:
            setattr(args, name, late)
    return args


def build_parser() -> argparse.ArgumentParser:
    common = _common("_sub")
    parser = argparse.ArgumentParser(prog=PROG, parents=[_common("")], description=(
        "Fit, certify and inspect invact activation tables (generated/tables/*.json) and generate code."))
    parser.set_defaults(root=None, debug=False)
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func, help: str, target: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=func)
        if target:
            p.add_argument("--target", choices=tables.TARGETS, default="derivative",
                           help="derivative table (runtime, default) or inverse table")
        return p

    add("list", cmd_list, "list activations: branches, codes, pieces and certified errors", target=False)
    p = add("fit", cmd_fit, "fit a built-in or a formula in x, write its table and regenerate code")
    from .expressions import allowed_summary
    p.epilog = (f"A formula may contain only {allowed_summary()}. Anything else is refused (exit 2): "
                "formulas are parsed, never run as Python. A derivative table's forward is generated code: a "
                "function it cannot compute (such as sin or erfc) is refused before the fit, naming it (exit "
                "2; --target inverse takes it). A formula starting with '-' is accepted as is.")
    p.add_argument("activation", metavar="NAME_OR_FORMULA",
                   help="a built-in name (see `invact list`), a formula such as 'x*sigmoid(1.702*x)', or "
                        "the name of a formula's table under --root (refit from its formula; --param values "
                        "replace its parameter set)")
    p.add_argument("--name", help="table name for a formula (a Python identifier); with a built-in, "
                   "fits its formula as a new table (for parameters other than PyTorch's defaults)")
    p.add_argument("--replace", action="store_true",
                   help="replace the table NAME even if it holds another formula (refused otherwise)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                   help="parameter value (repeatable); declares a parameter of a formula, which must "
                        "occur in it (x, y, function and constant names, Python keywords, name, backend, input, "
                        "self and names starting with '_' are reserved)")
    p.add_argument("--tolerance", type=_positive(float), default=DEFAULT_TOLERANCE,
                   help="max approximation error of g = f'(x): absolute where |g| < 1, relative above "
                        f"(default {tolerance_text(DEFAULT_TOLERANCE)}; accepted from "
                        f"{tolerance_text(MIN_TOLERANCE)} to {tolerance_text(MAX_TOLERANCE)}: a looser bound is coarser than bf16's rounding)")
    p.add_argument("--rationals", choices=RATIONAL_MODES, default="auto",
                   help="rational pieces: where they make the table cheaper to evaluate (auto, the "
                        "default), never, or on every fitted branch that has them (prefer)")
    _fp32_samples(p)
    _no_generate(p)
    p = add("certify", cmd_certify, "re-certify a table (rigorous bound and float checks) and update it")
    _name_arg(p)
    p.add_argument("--exhaustive", action="store_true", help="check every float32 value (slow)")
    _fp32_samples(p)
    _no_generate(p)
    _name_arg(add("show", cmd_show, "print a table: formula, branches, pieces and certificate"))
    p = add("plot", cmd_plot, "plot the approximation error per branch against the information floors")
    _name_arg(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.png", help="image file to write")
    add("generate", cmd_generate, "regenerate the torch, Triton and C code from all tables", target=False)
    return parser


def _name_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="table name (see `invact list`) or a path to a .json table")


def _fp32_samples(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fp32-samples", type=_positive(int), default=FP32_SAMPLES, metavar="N",
                   help=f"stratified float32 values checked per branch (default 2**{FP32_SAMPLES.bit_length() - 1}, "
                        f"at most 2**{MAX_FP32_SAMPLES.bit_length() - 1}: "
                        "there are no more float32 values; more is refused)")


def _no_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-generate", dest="generate_off", action="store_true",
                   help="do not regenerate the code after writing the table (the runtime refuses the old "
                        "code until `invact generate`)")


# --------------------------------------------------------------------------------------------
# entry point

_OPTION_LIKE = re.compile(r"--[A-Za-z][\w-]+(=.*)?")   # --word: a mistyped option, not a formula


def _formula_positional(argv: list, parser: argparse.ArgumentParser) -> list:
    """After ``fit``, an argument starting with '-' that is no option of the command (a formula such as
    '-x*sigmoid(x)') gets a leading space, so argparse takes it as the positional (cmd_fit strips it);
    one like ``--word`` is refused as an unknown option (exit 2), not read as a formula."""
    i = 0
    while i < len(argv) and isinstance(argv[i], str) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--root" else 1               # --root DIR, --root=DIR, --debug, ...
    if i >= len(argv) or argv[i] != "fit":
        return argv
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["fit"]
    options = [o for o in sub._option_string_actions] + list(parser._option_string_actions)
    takes_value = {o for o, a in sub._option_string_actions.items() if a.nargs != 0}
    out, skip = argv[:i + 1], False
    for arg in argv[i + 1:]:
        if not skip and isinstance(arg, str) and arg.startswith("-") and arg != "--" \
                and not sub._negative_number_matcher.match(arg) \
                and not any(o.startswith(arg.partition("=")[0]) for o in options):
            if _OPTION_LIKE.fullmatch(arg):
                sub.error(f"{arg.partition('=')[0]} is not an option of `{PROG} fit` (see `{PROG} fit --help`); "
                          "a formula starting with '-' reads as one, e.g. '-x*sigmoid(x)'")
            arg = " " + arg
        skip = isinstance(arg, str) and arg in takes_value
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the ``invact`` command line; returns the exit status."""
    cancel_after_import("torch")  # invact's ops: no saved program is loaded here, torch's import stays lean
    parser = build_parser()
    try:
        argv = _formula_positional(list(sys.argv[1:] if argv is None else argv), parser)
        args = _merge(parser.parse_args(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    old = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        tables.check_root(args.root, create=args.command == "fit")
        return args.func(args)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        _say(f"interrupted ({signal.Signals(signum).name}); no partial table or code was written")
        return 128 + signum
    except InputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `invact list | head`
        sys.stderr.close()
        return 0
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        _say(f"internal error: {type(exc).__name__}: {exc}")
        _say("this is a bug in invact" + ("" if args.debug else "; rerun with --debug for the traceback")
             + " and please report it")
        return 1
    finally:
        signal.signal(signal.SIGTERM, old)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
