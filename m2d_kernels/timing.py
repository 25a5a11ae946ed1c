"""Side-by-side timing that survives a busy machine: interleaved rounds, median and spread.

A speed-up printed from two back-to-back blocks of runs (all of A, then all of B) measures the
machine's load as much as the code: another process that starts halfway through slows one side
only. :func:`compare` runs the contenders in interleaved rounds (A B A B ...; the order inside a
round alternates, so neither side always runs first), so that both see the same load, and reports
per contender the median and the spread (interquartile range relative to the median) of its rounds,
the ratio of the medians, the torch thread count and the load average. A large spread, or a load
average above the number of cores, means the figures are not to be trusted: :attr:`Comparison.busy`
and :func:`format_warning` say so.

The torch thread count is set explicitly for the duration of a comparison (default: the cores this
process may run on, at most ``torch.get_num_threads()``): an oversubscribed OpenMP pool on a loaded
machine slows a multi-threaded reference by 30x where one thread does not, which is load, not kernel.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

# A contender whose rounds' interquartile range exceeds this share of its median was disturbed.
BUSY_SPREAD = 0.25


@dataclass(frozen=True)
class Timing:
    """Seconds of one contender's timed rounds (warm-up excluded)."""

    name: str
    seconds: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Interquartile range over the median (0 with fewer than 2 rounds)."""
        if len(self.seconds) < 2 or self.median <= 0:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.seconds, n=4, method="inclusive")
        return (q3 - q1) / self.median


@dataclass(frozen=True)
class Comparison:
    """Interleaved timings of several contenders, with the conditions they ran under."""

    timings: dict[str, Timing]
    rounds: int
    threads: int
    load_average: tuple[float, float, float] | None
    cores: int
    busy_spread: float = BUSY_SPREAD
    warnings: list[str] = field(default_factory=list)

    def ratio(self, slow: str, fast: str) -> float:
        """``median(slow) / median(fast)``: the speed-up of ``fast`` over ``slow``."""
        return self.timings[slow].median / self.timings[fast].median

    @property
    def busy(self) -> bool:
        return bool(self.warnings)

    def as_dict(self) -> dict:
        """JSON-ready: per contender median_ms, spread and the rounds in ms; conditions; warnings."""
        return {
            "rounds": self.rounds, "threads": self.threads, "cores": self.cores,
            "load_average": list(self.load_average) if self.load_average is not None else None,
            "timings": {name: {"median_ms": 1e3 * t.median, "spread": t.spread,
                               "rounds_ms": [1e3 * s for s in t.seconds]} for name, t in self.timings.items()},
            "warnings": list(self.warnings),
        }


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, or None where the OS has none."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous count after."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(previous)


def default_threads() -> int:
    return max(1, min(torch.get_num_threads(), available_cores()))


def compare(contenders: Mapping[str, Callable[[], object]], rounds: int = 5, warmup: int = 1,
            threads: int | None = None, clock: Callable[[], float] = time.perf_counter,
            load: Callable[[], tuple[float, float, float] | None] = load_average, cores: int | None = None,
            busy_spread: float = BUSY_SPREAD) -> Comparison:
    """Time every callable of ``contenders`` for ``rounds`` interleaved rounds after ``warmup`` untimed ones.

    Each callable must finish its work before returning (synchronise a GPU inside it). ``threads``: the torch
    thread count while timing (default :func:`default_threads`); ``clock``, ``load`` and ``cores`` are
    injectable for tests. The load average is read after the rounds (the load they ran under).
    """
    if not contenders:
        raise ValueError("contenders must name at least one callable")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    names = list(contenders)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    threads = default_threads() if threads is None else threads
    with torch_threads(threads):
        for _ in range(warmup):  # compilation, extension builds, allocator
            for name in names:
                contenders[name]()
        for index in range(rounds):
            # A B, then B A: neither contender always follows the other (caches, turbo, a queued job).
            for name in names if index % 2 == 0 else reversed(names):
                start = clock()
                contenders[name]()
                seconds[name].append(clock() - start)
    cores = available_cores() if cores is None else cores
    loads = load()
    timings = {name: Timing(name, tuple(seconds[name])) for name in names}
    return Comparison(timings, rounds, threads, loads, cores, busy_spread,
                      busy_warnings(timings.values(), loads, cores, busy_spread))


def busy_warnings(timings: Iterable[Timing], loads: tuple[float, float, float] | None, cores: int,
                  busy_spread: float = BUSY_SPREAD) -> list[str]:
    """Why the figures may reflect the machine's load rather than the code (empty when nothing says so)."""
    found = []
    for timing in timings:
        if timing.spread > busy_spread:
            found.append(f"{timing.name}: its rounds spread by {100 * timing.spread:.0f} % of the median "
                         f"(interquartile range; above {100 * busy_spread:.0f} %)")
    if loads is not None and loads[0] > cores:
        found.append(f"load average {loads[0]:.2f} is above the {cores} core(s)")
    return found


def format_conditions(comparison: Comparison) -> str:
    loads = ("load average " + " / ".join(f"{x:.2f}" for x in comparison.load_average) + " (1/5/15 min)"
             if comparison.load_average is not None else "load average unknown")
    return (f"{comparison.rounds} interleaved rounds, {comparison.threads} torch thread(s), "
            f"{comparison.cores} core(s), {loads}")


def format_timing(timing: Timing) -> str:
    return f"{1e3 * timing.median:.2f} ms (spread {100 * timing.spread:.0f} %)"


def format_warning(comparison: Comparison) -> str:
    """One line when the machine looked busy, else ''."""
    if not comparison.busy:
        return ""
    return ("warning: the machine looked busy, these timings are not reliable: " + "; ".join(comparison.warnings)
            + ". Rerun on an idle machine, or with fewer torch threads.")
