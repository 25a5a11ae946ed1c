"""Backend ``cpp``: one pass of the backend contract (backends/base.py) in C++ with OpenMP, for CPU tensors.

The math is the one of ``torch_prefix.py``; the kernels are in ``csrc/m2d_cpu.cpp``.
Forward keeps per-row statistics only (the maximum and the log of the scaled sum, apart,
so large scales lose no accuracy); backward recomputes the similarities tile by tile with
the forward's exact operations, so nothing of size ``B x N`` is allocated. fp32 and fp64
run natively; fp16/bf16 inputs are converted to fp32 on entry.

The extension is taken from an ahead-of-time build (``m2d_kernels._C``, ``M2D_BUILD_EXT=1
pip install --no-build-isolation .``) when present, otherwise compiled on first use with
``torch.utils.cpp_extension.load`` (ninja, a runtime dependency) into
``<root>/m2d_kernels_cpu-<key>``: ``<root>`` is ``$M2D_BUILD_DIR``, else torch's extension
root (``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``), and ``<key>`` hashes the
torch and Python versions, the compiler and its flags and the source, so two environments or
two source versions never rebuild each other's folder or load a foreign build. No
``-march=native`` unless ``M2D_ISA=native`` (the key then includes the CPU model); ``M2D_ISA`` picks the
epilogues' instruction set (``isa``). Builds are serialised by an ``flock`` that the kernel drops when its
holder dies, so a process killed mid-build never blocks the next one; a live holder is
waited for at most ``$M2D_BUILD_TIMEOUT`` seconds (default 900). The outcome, success or
the compiler's error, is cached for the process.

Code is loaded only from a folder and a library that belong to the current user and that no one
else can write (a shared root such as ``/tmp`` could otherwise hold another user's library under
the predictable key), and only when the library is the one the marker ``m2d-build.done``
recorded after the build (size and SHA-256, both written durably): a truncated or replaced
library is rebuilt under the lock instead of being loaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from m2d_kernels._files import atomic_write, fsync_folder, not_private_reason, open_no_follow
from m2d_kernels.backends.base import PassGradients, PassStatistics, Softmax, check_columns
from m2d_kernels.numerics import accumulator_dtype, fixed_max_is_exact, prefix_norms
from m2d_kernels.rules import PENALTY_CODES, PLAIN, check_rules

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

try:
    import fcntl
except ImportError:  # Windows: torch's own lock file only
    fcntl = None

EXTENSION_NAME = "m2d_kernels_cpu"
SOURCE_NAME = "m2d_cpu.cpp"
# Lines of the compiler's output quoted when the build fails.
REASON_LINES = 12
LOCK_NAME = "m2d-build.lock"
LIBRARY_NAME = f"{EXTENSION_NAME}.so"
# Written after a successful build: the library's size and SHA-256, checked before every load.
DONE_NAME = "m2d-build.done"
DEFAULT_BUILD_TIMEOUT_S = 900.0
LOCK_POLL_S = 0.2


def _source_path() -> Path | None:
    """csrc/m2d_cpu.cpp from a source checkout, or its copy shipped inside the package."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package.parent / "csrc" / SOURCE_NAME, package / "csrc" / SOURCE_NAME):
        if candidate.is_file():
            return candidate
    return None


ISA_ENV = "M2D_ISA"
# The instruction sets the epilogue loops can be compiled for (the products go through PyTorch's BLAS, which
# picks its own at run time): the flags, and the CPU flags each needs.
ISA_FLAGS = {
    "baseline": ([], set()),
    "avx2": (["-mavx2", "-mfma"], {"avx2", "fma"}),
    "avx512": (["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma", "-mprefer-vector-width=512"],
               {"avx512f", "avx512dq", "avx512bw", "avx512vl", "fma"}),
    "native": (["-march=native"], set()),
}


def isa() -> str:
    """The ISA the extension is built for: ``$M2D_ISA`` (one of ``ISA_FLAGS``), else ``avx2`` on an x86-64 CPU
    with AVX2 and FMA, else ``baseline``. ``native`` (``-march=native``) keys the build by the CPU model."""
    chosen = os.environ.get(ISA_ENV)
    x86 = platform.machine() in ("x86_64", "AMD64")
    if chosen is None:
        return "avx2" if x86 and ISA_FLAGS["avx2"][1] <= _cpu_flags() else "baseline"
    if chosen not in ISA_FLAGS:
        raise ValueError(f"{ISA_ENV} must be one of {tuple(ISA_FLAGS)}, got {chosen!r}")
    missing = ISA_FLAGS[chosen][1] - _cpu_flags()
    if missing and x86:
        raise ValueError(f"{ISA_ENV}={chosen}: this CPU lacks {', '.join(sorted(missing))}")
    return chosen


def build_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags): portable by default (module docstring, ``isa``); every flag is part of the
    build folder's key, so each ISA builds into a folder of its own."""
    isa_flags = ISA_FLAGS[isa()][0]
    if isa() == "native" and "avx512f" in _cpu_flags():
        # GCC's -march=native keeps 256-bit vectors on recent Intel CPUs; the avx512 ISA asks for 512 already.
        isa_flags = isa_flags + ["-mprefer-vector-width=512"]
    # No fused multiply-add contraction: it would let z - max skip rounding z, so forward and
    # backward could see different logits (and at scale 1e10, exp of a large positive number).
    # -fno-trapping-math (no FP-exception flags are read) lets GCC if-convert the clamps of
    # vector_exp: without it every epilogue loop ran scalar with branches, 6.5x slower.
    return ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", *isa_flags], ["-fopenmp"]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return set(next((line for line in cpuinfo if line.startswith("flags")), ":").split(":", 1)[1].split())
    except OSError:
        return set()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("model name", "flags"))), platform.processor())
    except OSError:
        return platform.processor()


def build_directory(source: Path) -> Path:
    """The JIT build folder for this torch, Python, compiler, flags and source."""
    from torch.utils import cpp_extension

    cflags, ldflags = build_flags()
    parts = [
        torch.__version__,
        str(torch.version.git_version),
        sys.implementation.cache_tag,
        platform.machine(),
        os.environ.get("CXX", "c++"),
        " ".join(cflags + ldflags),
        _cpu_model() if "-march=native" in cflags else "",
        hashlib.sha256(source.read_bytes()).hexdigest(),
    ]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    root = (os.environ.get("M2D_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
            or cpp_extension.get_default_build_root())
    return Path(root) / f"{EXTENSION_NAME}-{key}"


@contextlib.contextmanager
def build_lock(folder: Path, timeout_s: float):
    """Exclusive right to build in ``folder``. An ``flock`` dies with its process, so a build
    killed midway leaves nothing that blocks; torch's own ``lock`` file, which a killed build
    does leave behind (and on which torch would wait forever), is removed once we hold ours."""
    if fcntl is None:
        yield
        return
    with open(open_no_follow(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600), "r+") as handle:
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"gave up after {timeout_s:.0f} s waiting for process {owner} to finish building the C++ "
                        f"backend in {folder} (lock {folder / LOCK_NAME}); set M2D_BUILD_TIMEOUT to wait longer"
                    ) from None
                if not announced:
                    print(f"m2d-kernels: waiting for process {owner} building the C++ backend in {folder}...",
                          file=sys.stderr, flush=True)
                    announced = True
                time.sleep(LOCK_POLL_S)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        (folder / "lock").unlink(missing_ok=True)
        yield


def build_timeout() -> float:
    """``$M2D_BUILD_TIMEOUT`` seconds (default 900): a finite number >= 0, or a ValueError naming it."""
    raw = os.environ.get("M2D_BUILD_TIMEOUT")
    if raw is None:
        return DEFAULT_BUILD_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"M2D_BUILD_TIMEOUT must be a finite number of seconds >= 0, got {raw!r}")
    return value


def _check_private(path: Path, what: str) -> None:
    reason = not_private_reason(path)
    if reason is not None:
        raise PermissionError(f"refusing to load the C++ backend from the {what} {path}: {reason}. Code is loaded "
                              "only from your own folders that no one else can write; set M2D_BUILD_DIR to a "
                              "private folder (or remove this one)")


def _library_record(library: Path) -> dict:
    data = library.read_bytes()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _built(folder: Path) -> bool:
    """Whether ``folder`` holds a complete build: the library its marker recorded, byte for byte."""
    try:
        recorded = json.loads((folder / DONE_NAME).read_text())
    except (OSError, ValueError):
        return False
    library = folder / LIBRARY_NAME
    _check_private(library, "library")
    try:
        return isinstance(recorded, dict) and _library_record(library) == recorded
    except OSError:
        return False


def _load_built(folder: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(EXTENSION_NAME, folder / LIBRARY_NAME)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clear_build(folder: Path) -> None:
    """Everything of a failed or damaged build but the lock, so that ninja rebuilds (it would trust the
    timestamps of a truncated library)."""
    for entry in folder.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _compile() -> ModuleType:
    from torch.utils import cpp_extension

    source = _source_path()
    if source is None:
        raise RuntimeError(f"the C++ source csrc/{SOURCE_NAME} is missing from this installation")
    timeout_s = build_timeout()
    folder = build_directory(source)
    _check_private(folder, "build folder")
    if _built(folder):
        return _load_built(folder)
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed: `pip install ninja` (a dependency of m2d-kernels)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.mkdir(mode=0o700, exist_ok=True)
    _check_private(folder, "build folder")  # created by someone else between the check and mkdir
    with build_lock(folder, timeout_s):
        if _built(folder):  # built by the process we waited for
            return _load_built(folder)
        _clear_build(folder)
        # Measured once: 43 s of CPU time, 2.6 min wall on a busy 2-core VM (docs/benchmarks.md).
        print(f"m2d-kernels: compiling the C++ backend into {folder} (once per torch version and source; "
              "about 45 s of CPU time, longer on a busy machine)...", file=sys.stderr, flush=True)
        cflags, ldflags = build_flags()
        module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(source)],
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            build_directory=str(folder),
            verbose=False,
        )
        library = folder / LIBRARY_NAME
        with open(library, "rb") as file:  # the library on disk before the marker that vouches for it
            os.fsync(file.fileno())
        fsync_folder(folder)
        record = json.dumps(_library_record(library)).encode()
        atomic_write(folder / DONE_NAME, lambda file: file.write(record))
    return module


@functools.cache
def _extension() -> tuple[ModuleType | None, str | None]:
    """The compiled module and None, or None and why it could not be built (tried once per process)."""
    try:
        return importlib.import_module("m2d_kernels._C"), None
    except ImportError:
        pass
    try:
        return _compile(), None
    except Exception as error:  # the compiler's message is the reason a user needs to see
        lines = str(error).strip().splitlines()
        return None, "building the C++ extension failed: " + "\n".join(lines[:REASON_LINES])


def unavailable_reason(device: torch.device) -> str | None:
    if torch.device(device).type != "cpu":
        return "cpp backend runs on CPU tensors"
    return _extension()[1]


def build_status() -> tuple[str, str | None]:
    """``(state, detail)`` of the extension without compiling or loading it: ``"ready"`` (loaded in this process,
    an ahead-of-time build, or a verified JIT build folder), ``"buildable"`` (source, ninja and a compiler are here:
    the first call compiles it), or ``"unavailable"`` with the reason."""
    if _extension.cache_info().currsize:  # already tried in this process: its outcome
        module, reason = _extension()
        return ("ready", "loaded") if module is not None else ("unavailable", reason)
    if importlib.util.find_spec("m2d_kernels._C") is not None:
        return "ready", "ahead-of-time build (m2d_kernels._C)"
    source = _source_path()
    if source is None:
        return "unavailable", f"the C++ source csrc/{SOURCE_NAME} is missing from this installation"
    folder = build_directory(source)
    try:
        if _built(folder):
            return "ready", f"built in {folder}"
    except Exception as error:  # a folder or library we would refuse to load: the first call says why
        return "unavailable", str(error)
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "unavailable", "ninja is not installed: `pip install ninja` (a dependency of m2d-kernels)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler.split()[0]) is None:
        return "unavailable", f"no C++ compiler ({compiler}) on the PATH"
    return "buildable", f"compiled into {folder} on the first call"


def probe(device: torch.device) -> str | None:
    """Like :func:`unavailable_reason`, but never compiles: None when the backend is ready or buildable here."""
    if torch.device(device).type != "cpu":
        return "cpp backend runs on CPU tensors"
    state, detail = build_status()
    return detail if state == "unavailable" else None


def shares_tiles(similarity: str, scale: float | None = None) -> bool:
    """The pass applies rules.triangle and rules.column_statistics for every similarity and scale."""
    return True


# ---------------------------------------------------------------------------------------
# The pass (backends/base.py): the extension's forward and backward on one block of columns, with the
# rules of m2d_kernels.rules as runtime arguments that the kernels turn into template arguments once per
# call (the plain pass runs loops with no rule in them).
# ---------------------------------------------------------------------------------------


def _rows_read_in_place(rows: torch.Tensor) -> bool:
    """Whether the kernels read ``rows`` [L, R, D] without a copy (the extension's check_inputs): contiguous
    rows whose layers lie at least ``R * D`` apart, e.g. a prefix ``cols[:, :R]`` (objective._merged_pass)."""
    n_layers, n_rows, n_features = rows.shape
    return ((n_features == 1 or rows.stride(2) == 1) and (n_rows == 1 or rows.stride(1) == n_features)
            and (n_layers == 1 or rows.stride(0) >= n_rows * n_features))


def _pass_operands(rows, cols, dims, rules, norms=None):
    """Rows and columns in the accumulator dtype with their inverse prefix norms and norm-gradient factors
    (``norms``: given by the caller); with "dot", unit inverse norms (the kernels' logits become
    ``scale * <x, y>``; no norm term)."""
    dtype = accumulator_dtype(rows.dtype)
    q, k = rows.detach().to(dtype), cols.detach().to(dtype).contiguous()
    if not _rows_read_in_place(q):
        q = q.contiguous()
    if rules.similarity == "dot":
        ones_q, ones_k = q.new_ones(q.shape[0], q.shape[1], len(dims)), k.new_ones(k.shape[0], k.shape[1], len(dims))
        return q, k, (ones_q, ones_q), (ones_k, ones_k)
    row_norms, col_norms = norms or (None, None)
    return q, k, prefix_norms(q, dims, dtype, row_norms), prefix_norms(k, dims, dtype, col_norms)


def _rule_arguments(rules, dtype, n_rows, n_cols, active=None, distill=False):
    """The extension's rule arguments, once ``rules`` are checked (``rules.check_rules``): (normalised,
    group_period, row_group, exclude_own_group, penalty, penalty_strength, guide_rows, guide_cols,
    guide_threshold, triangle, column_statistics); empty tensors for rules that are off."""
    check_rules(rules, n_rows, n_cols, active, distill)
    row_group = torch.empty(0, dtype=torch.int64)
    if rules.exclude_own_group or rules.penalty is not None:
        row_group = rules.row_group.to(torch.int64).contiguous()
    guide = (torch.empty(0, dtype=dtype),) * 3
    if rules.guided:
        # The guide product in the accumulator dtype (fp32 at least, fp64 for fp64 rows).
        guide = tuple(t.detach().to(dtype).contiguous() for t in (rules.guide_rows, rules.guide_cols,
                                                                   rules.guide_threshold))
    return (rules.similarity == "cos", rules.group_period, row_group, rules.exclude_own_group,
            PENALTY_CODES[rules.penalty], float(rules.penalty_strength), *guide, rules.triangle,
            rules.column_statistics)


def _fixed_max(rules, scale, dtype) -> bool:
    """Whether the kernels take ``rules.max_logit(scale)`` as every softmax's offset (numerics)."""
    max_logit = rules.max_logit(scale)
    return max_logit is not None and fixed_max_is_exact(max_logit, dtype)


def row_statistics(rows, cols, dims, active, scale, positives, rules=PLAIN, norms=None) -> PassStatistics:
    """The pass's forward (backends/base.py), in the accumulator dtype. A statistic column with every entry
    excluded has offset 0 and log_sum -inf."""
    q, k, (inv_q, _), (inv_k, _) = _pass_operands(rows, cols, dims, rules, norms)
    (offset, log_sum, positive, teacher_sum, col_offset, col_log_sum, row_mean_cos,
     col_mean_cos) = _extension()[0].pass_forward(
        q, k, inv_q, inv_k, positives.to(torch.int64).contiguous(), list(dims), torch.tensor(active, dtype=torch.bool),
        scale, *_rule_arguments(rules, q.dtype, q.shape[1], k.shape[1], active), rules.teacher, rules.scale_slope,
        _fixed_max(rules, scale, q.dtype), torch.get_num_threads(),
    )
    # The kernels' slope is E_p[cos]; the contract's E_p[z] (plain rules: z = scale * cos).
    columns = None
    if rules.column_statistics:
        columns = Softmax(col_offset, col_log_sum, col_mean_cos * scale if rules.scale_slope else None)
    return PassStatistics(Softmax(offset, log_sum, row_mean_cos * scale if rules.scale_slope else None), positive,
                          teacher_sum if rules.teacher else None, columns)


def pass_gradients(rows, cols, dims, active, scale, positives, softmax, coef, rules=PLAIN, distill_coef=None,
                   columns=None, norms=None) -> PassGradients:
    """The pass's backward (backends/base.py), in the accumulator dtype."""
    q, k, (inv_q, norm_q), (inv_k, norm_k) = _pass_operands(rows, cols, dims, rules, norms)
    rule_arguments = _rule_arguments(rules, q.dtype, q.shape[1], k.shape[1], active, distill_coef is not None)
    check_columns(rules, columns, len(active), len(dims))
    if columns is not None:
        col_offset, col_log_sum = columns.offset.to(q.dtype).contiguous(), columns.log_sum.to(q.dtype).contiguous()
    else:
        col_offset = col_log_sum = q.new_empty(0)
    # The extension's coefficients multiply d z / d s per similarity: scale times ours, per row loss.
    distill = q.new_empty(0) if distill_coef is None else (distill_coef * scale).to(q.dtype).contiguous()
    fixed_max = _fixed_max(rules, scale, q.dtype) and distill_coef is None
    d_rows, d_cols = _extension()[0].pass_backward(
        q, k, inv_q, inv_k, norm_q, norm_k, positives.to(torch.int64).contiguous(), list(dims),
        torch.tensor(active, dtype=torch.bool), scale, *rule_arguments, fixed_max,
        softmax.offset.to(q.dtype).contiguous(), softmax.log_sum.to(q.dtype).contiguous(), col_offset, col_log_sum,
        (coef * scale).to(q.dtype).contiguous(), distill, torch.get_num_threads(),
    )
    return PassGradients(d_rows, d_cols)
