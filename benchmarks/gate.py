"""The benchmark regression gate: each suite against the stored run of the same suite on the same kind of machine.

pytest-benchmark's own ``--benchmark-compare`` takes the latest file of a folder named after the OS and
Python ("Linux-CPython-3.11-64bit"), whatever suite and CPU it holds: it compared the loss suite with
the options suite (no common test, exit 0) and an Intel run with an AMD baseline. This gate matches on
what decides the speed:

* the machine key, from the run's ``machine_info``: CPU model (py-cpuinfo's ``brand_raw``, or the
  GPU name when the run used one), the torch thread count and the torch version;
* the suite: the benchmark file (``test_bench_loss.py``, ...); a stored run counts as a baseline of a
  suite when it holds that suite's benchmarks, and the most recent such run on the same key is used.

It fails (exit 1) when a benchmark's median is more than ``--threshold`` (default 20 %) slower than
the baseline's. Absolute medians are compared only within one machine key. Across machines it gates
the ratios measured side by side in one run: each provider's median over the median of ``torch.mm``
at the same shape (``test_bench_cpp.py``), e.g. ``cpp / torch.mm``; they are compared with the same
machine's baseline when there is one, else with the most recent run of any machine (a looser
``--ratio-threshold``, default 35 %, as the ratio still depends on the CPU's vector units). With no
baseline for this machine it says so, and how to record one, and passes unless ``--require-baseline``.

    python benchmarks/gate.py check            # run test_bench_loss.py + test_bench_cpp.py, then compare
    python benchmarks/gate.py compare RUN.json # compare a run saved with --benchmark-json
    python benchmarks/gate.py record           # run the suites and store the baseline of this machine
    python benchmarks/gate.py key              # this machine's key (run once to read it)

Arguments after ``--`` go to pytest (e.g. ``-- -k "cpp or torch_mm"`` for a shorter run). Baselines are
stored as ``<storage>/baselines/<key>/<UTC date-time>.json``; every pytest-benchmark JSON under
``<storage>`` (also those of ``--benchmark-save``) is read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from m2d_kernels._files import atomic_write

HERE = Path(__file__).resolve().parent
DEFAULT_STORAGE = HERE / "results"
DEFAULT_SUITES = ("test_bench_loss.py", "test_bench_cpp.py")
DEFAULT_THRESHOLD = 0.20
DEFAULT_RATIO_THRESHOLD = 0.35
# The provider every other one of a shape is divided by in the side-by-side ratios.
RATIO_BASE = "torch.mm"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of a run: ``name`` is ``<suite file>::<test id>``."""

    name: str
    suite: str
    group: str | None
    provider: str | None
    median: float


@dataclass
class Run:
    """One pytest-benchmark JSON file."""

    path: Path
    key: str
    when: str
    benchmarks: dict[str, Benchmark]
    machine_info: dict = field(default_factory=dict)

    @property
    def suites(self) -> set[str]:
        return {bench.suite for bench in self.benchmarks.values()}

    def ratios(self) -> dict[str, float]:
        """``"<group>: <provider> / torch.mm"`` -> median over torch.mm's median at the same shape."""
        bases = {bench.group: bench.median for bench in self.benchmarks.values() if bench.provider == RATIO_BASE}
        return {f"{bench.group}: {bench.provider} / {RATIO_BASE}": bench.median / bases[bench.group]
                for bench in self.benchmarks.values()
                if bench.group in bases and bench.provider not in (None, RATIO_BASE) and bases[bench.group] > 0}


@dataclass(frozen=True)
class Row:
    """One compared figure: a median (seconds) or a ratio; ``change`` is new / baseline - 1."""

    name: str
    baseline: float
    new: float
    threshold: float
    baseline_path: Path

    @property
    def change(self) -> float:
        return self.new / self.baseline - 1

    @property
    def failed(self) -> bool:
        return self.change > self.threshold


@dataclass
class GateResult:
    """What the gate compared, what it could not, and whether it passed."""

    key: str
    medians: list[Row] = field(default_factory=list)
    ratios: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing_baseline: list[str] = field(default_factory=list)
    require_baseline: bool = False

    @property
    def failures(self) -> list[Row]:
        return [row for row in self.medians + self.ratios if row.failed]

    @property
    def passed(self) -> bool:
        return not self.failures and not (self.require_baseline and self.missing_baseline)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.+]+", "-", text.lower()).strip("-") or "unknown"


def machine_key(machine_info: dict) -> str:
    """``<cpu or gpu model>_<N>threads_torch-<version>``: what a stored median is comparable across."""
    device = str(machine_info.get("device") or "")
    cpu = (machine_info.get("cpu") or {}).get("brand_raw") or machine_info.get("processor") or \
        machine_info.get("machine") or "unknown-cpu"
    model = device if device and not device.startswith("cpu") else cpu
    threads = machine_info.get("cpu_threads", "unknown")
    return f"{_slug(model)}_{threads}threads_torch-{_slug(str(machine_info.get('torch', 'unknown')))}"


def _suite_and_name(fullname: str) -> tuple[str, str]:
    file_part, _, test = fullname.partition("::")
    suite = Path(file_part).name
    return suite, f"{suite}::{test}"


def read_run(path: Path) -> Run | None:
    """The run stored in ``path``, or None when it is not a pytest-benchmark JSON (other results live there too)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list) or "machine_info" not in data:
        return None
    benchmarks = {}
    for entry in data["benchmarks"]:
        try:
            suite, name = _suite_and_name(entry["fullname"])
            median = float(entry["stats"]["median"])
        except (KeyError, TypeError, ValueError):
            continue
        extra = entry.get("extra_info") or {}
        benchmarks[name] = Benchmark(name, suite, entry.get("group"), extra.get("provider"), median)
    if not benchmarks:
        return None
    return Run(Path(path), machine_key(data["machine_info"]), str(data.get("datetime", "")), benchmarks,
               data["machine_info"])


def stored_runs(storage: Path, exclude: Path | None = None) -> list[Run]:
    runs = []
    for path in sorted(Path(storage).rglob("*.json")):
        if exclude is not None and path.resolve() == Path(exclude).resolve():
            continue
        run = read_run(path)
        if run is not None:
            runs.append(run)
    return runs


def record_command(storage: Path) -> str:
    default = Path(storage).resolve() == DEFAULT_STORAGE
    return "python benchmarks/gate.py record" + ("" if default else f" --storage {storage}")


def compare(new: Run, stored: list[Run], threshold: float = DEFAULT_THRESHOLD,
            ratio_threshold: float = DEFAULT_RATIO_THRESHOLD, require_baseline: bool = False,
            storage: Path = DEFAULT_STORAGE) -> GateResult:
    """Gate ``new`` against ``stored``: per suite the latest earlier stored run of that suite with ``new``'s machine
    key (medians), and the side-by-side ratios against the latest earlier run that has them (this machine's first)."""
    result = GateResult(new.key, require_baseline=require_baseline)
    # A stored run compared on its own (``compare`` of a saved file) is gated against the runs before it.
    stored = [run for run in stored if not (new.when and run.when and run.when >= new.when)]
    same_machine = [run for run in stored if run.key == new.key]
    for suite in sorted(new.suites):
        candidates = [run for run in same_machine
                      if suite in run.suites and set(run.benchmarks) & {n for n, b in new.benchmarks.items()
                                                                        if b.suite == suite}]
        if not candidates:
            others = sorted({run.key for run in stored if suite in run.suites})
            result.missing_baseline.append(suite)
            result.notes.append(
                f"no baseline of {suite} for this machine ({new.key}); medians are not compared. "
                f"Record one on an idle machine with `{record_command(storage)}` and commit it"
                + (f" (stored baselines of {suite} are for: {', '.join(others)})" if others else ""))
            continue
        baseline = max(candidates, key=lambda run: run.when)
        for name, bench in sorted(new.benchmarks.items()):
            if bench.suite == suite and name in baseline.benchmarks:
                result.medians.append(Row(name, baseline.benchmarks[name].median, bench.median, threshold,
                                          baseline.path))
        unmatched = sorted(n for n, b in new.benchmarks.items() if b.suite == suite and n not in baseline.benchmarks)
        if unmatched:
            result.notes.append(f"{len(unmatched)} benchmark(s) of {suite} are not in its baseline {baseline.path.name}"
                                f": {', '.join(unmatched)}")
    baseline_paths = {row.baseline_path for row in result.medians}
    compared = [(new, "this run")] + [(run, f"the baseline {run.path.name}") for run in stored
                                      if run.path in baseline_paths]
    for run, role in compared:
        busy = _busy_reason(run)
        if busy:
            result.notes.append(f"{role} ran on a busy machine ({busy}): its medians measure the load as much as "
                                "the code; the ratios are the figures to trust")
    new_ratios = new.ratios()
    if new_ratios:
        with_ratios = [run for run in stored if set(run.ratios()) & set(new_ratios)]
        own = [run for run in with_ratios if run.key == new.key]
        if own or with_ratios:
            baseline = max(own or with_ratios, key=lambda run: run.when)
            ratio_limit = threshold if own else ratio_threshold
            if not own:
                result.notes.append(f"ratios compared with another machine's run ({baseline.key}, "
                                    f"{baseline.path.name}) at the looser threshold {100 * ratio_limit:.0f} %")
            old = baseline.ratios()
            for name, value in sorted(new_ratios.items()):
                if name in old:
                    result.ratios.append(Row(name, old[name], value, ratio_limit, baseline.path))
        else:
            result.notes.append("no stored run has the side-by-side ratios: nothing to compare them with")
    return result


def _busy_reason(run: Run) -> str | None:
    """Why a run's medians are suspect: its 1-minute load average (start or end) above the CPU count."""
    cores = (run.machine_info.get("cpu") or {}).get("count")
    loads = [run.machine_info.get(key) for key in ("load_average_start", "load_average")]
    worst = max((load[0] for load in loads if load), default=None)
    if cores and worst is not None and worst > cores:
        return f"load average {worst:.2f} on {cores} cores"
    return None


def format_result(result: GateResult) -> str:
    lines = [f"benchmark gate, machine {result.key}"]
    for title, rows, unit in (("medians (same machine)", result.medians, "ms"), ("ratios", result.ratios, "")):
        if not rows:
            continue
        lines.append(f"{title}:")
        for row in rows:
            scale = 1e3 if unit else 1.0
            verdict = "FAIL" if row.failed else "ok"
            lines.append(f"  {verdict:<4} {row.name}: {scale * row.baseline:.3f}{unit} -> {scale * row.new:.3f}{unit} "
                         f"({100 * row.change:+.1f} %, limit +{100 * row.threshold:.0f} %; baseline "
                         f"{row.baseline_path.name})")
    lines.extend(f"note: {note}" for note in result.notes)
    if result.failures:
        lines.append(f"FAILED: {len(result.failures)} figure(s) slower than their limit")
    elif result.require_baseline and result.missing_baseline:
        lines.append(f"FAILED: no baseline for {', '.join(result.missing_baseline)} on this machine "
                     "(--require-baseline)")
    else:
        lines.append(f"passed: {len(result.medians)} median(s) and {len(result.ratios)} ratio(s) within their limits")
    return "\n".join(lines)


def run_suites(json_path: Path, suites: list[str], pytest_args: list[str]) -> int:
    """Run the benchmark files with pytest, writing pytest-benchmark's JSON to ``json_path``."""
    command = [sys.executable, "-m", "pytest", *(str(HERE / suite) for suite in suites), "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={json_path}", *pytest_args]
    print("running:", " ".join(command), flush=True)
    return subprocess.call(command, cwd=HERE.parent)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("check", "run the suites, then compare"), ("compare", "compare a stored run"),
                       ("record", "run the suites and store this machine's baseline"),
                       ("key", "print this machine's key (runs nothing)")):
        command = sub.add_parser(name, help=text)
        command.add_argument("--storage", type=Path, default=DEFAULT_STORAGE,
                             help=f"folder of stored runs (default {DEFAULT_STORAGE.relative_to(HERE.parent)})")
        if name in ("check", "compare"):
            command.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                                 help="largest median slow-down allowed, a fraction (default 0.2: 20 %%)")
            command.add_argument("--ratio-threshold", type=float, default=DEFAULT_RATIO_THRESHOLD,
                                 help="the same for ratios compared with another machine's run (default 0.35)")
            command.add_argument("--require-baseline", action="store_true",
                                 help="fail when a suite has no baseline for this machine")
        if name in ("check", "record"):
            command.add_argument("--suite", action="append", dest="suites",
                                 help="benchmark file to run, repeatable "
                                      f"(default {' and '.join(DEFAULT_SUITES)})")
        if name == "compare":
            command.add_argument("run", type=Path,
                                 help="a pytest-benchmark JSON (--benchmark-json or --benchmark-save)")
    return parser


def this_machine_key() -> str:
    """The key a run on this machine gets (machine_info as benchmarks/conftest.py and pytest-benchmark fill it)."""
    import platform

    import cpuinfo
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return machine_key({"cpu": {"brand_raw": cpuinfo.get_cpu_info().get("brand_raw")}, "device": device,
                        "processor": platform.processor(), "cpu_threads": torch.get_num_threads(),
                        "torch": torch.__version__})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = _parser().parse_args(argv)
    if args.command == "key":
        print(this_machine_key())
        return 0
    if args.command == "compare":
        new = read_run(args.run)
        if new is None:
            print(f"gate: {args.run} is not a pytest-benchmark JSON with benchmarks", file=sys.stderr)
            return 2
        result = compare(new, stored_runs(args.storage, exclude=args.run), args.threshold, args.ratio_threshold,
                         args.require_baseline, args.storage)
        print(format_result(result))
        return 0 if result.passed else 1
    suites = args.suites or list(DEFAULT_SUITES)
    with tempfile.TemporaryDirectory() as folder:
        json_path = Path(folder) / "run.json"
        status = run_suites(json_path, suites, pytest_args)
        new = read_run(json_path)
        if status != 0 or new is None:
            print(f"gate: the benchmark run failed (pytest exit status {status})", file=sys.stderr)
            return 2
        if args.command == "record":
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            target = args.storage / "baselines" / new.key / f"{stamp}.json"
            payload = json_path.read_bytes()
            atomic_write(target, lambda file: file.write(payload))  # never half a baseline, never through a link
            loads = new.machine_info.get("load_average")
            print(f"recorded the baseline of {', '.join(sorted(new.suites))} for {new.key} in {target}"
                  + (f" (load average during the run {loads})" if loads else ""))
            return 0
        result = compare(new, stored_runs(args.storage), args.threshold, args.ratio_threshold,
                         args.require_baseline, args.storage)
        print(format_result(result))
        return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
