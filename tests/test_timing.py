"""m2d_kernels.timing: interleaved rounds, medians, spread and the busy-machine warning, on a fake clock
(no real timing: every duration below is chosen by the test)."""

from __future__ import annotations

import pytest
import torch

from m2d_kernels import timing


class FakeClock:
    """A clock that each contender advances by its own scripted durations, recording the call order."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def contender(self, name: str, durations: list[float]):
        remaining = list(durations)

        def run():
            self.calls.append(name)
            self.now += remaining.pop(0)

        return run


def test_rounds_are_interleaved_and_medians_are_the_scripted_ones():
    clock = FakeClock()
    # One warm-up each (durations 100 s, excluded), then 5 timed rounds.
    slow = clock.contender("slow", [100, 10, 12, 11, 50, 9])
    fast = clock.contender("fast", [100, 1, 1.2, 1.1, 5, 0.9])
    result = timing.compare({"slow": slow, "fast": fast}, rounds=5, warmup=1, threads=1, clock=clock,
                            load=lambda: (0.1, 0.1, 0.1), cores=2)
    # Warm-up, then A B, B A, A B, B A, A B.
    assert clock.calls == ["slow", "fast", "slow", "fast", "fast", "slow", "slow", "fast", "fast", "slow",
                           "slow", "fast"]
    assert result.timings["slow"].seconds == pytest.approx((10, 12, 11, 50, 9))
    assert result.timings["slow"].median == pytest.approx(11)
    assert result.timings["fast"].median == pytest.approx(1.1)
    assert result.ratio("slow", "fast") == pytest.approx(10.0)
    # Inclusive quartiles of (9, 10, 11, 12, 50): 10 and 12, so the spread is 2 / 11.
    assert result.timings["slow"].spread == pytest.approx(2 / 11)
    assert not result.busy and timing.format_warning(result) == ""
    assert result.threads == 1 and result.load_average == (0.1, 0.1, 0.1)


def test_a_wide_spread_warns_that_the_machine_was_busy():
    clock = FakeClock()
    steady = clock.contender("steady", [1, 1, 1, 1, 1])
    disturbed = clock.contender("disturbed", [1, 1, 3, 1, 3])
    result = timing.compare({"steady": steady, "disturbed": disturbed}, rounds=4, warmup=1, threads=1,
                            clock=clock, load=lambda: (0.5, 0.5, 0.5), cores=2)
    assert result.busy
    assert len(result.warnings) == 1 and result.warnings[0].startswith("disturbed:")
    assert "not reliable" in timing.format_warning(result)


def test_a_load_above_the_cores_warns_even_with_steady_rounds():
    clock = FakeClock()
    result = timing.compare({"a": clock.contender("a", [1] * 4)}, rounds=3, warmup=1, threads=1, clock=clock,
                            load=lambda: (2.9, 2.5, 2.3), cores=2)
    assert result.warnings == ["load average 2.90 is above the 2 core(s)"]
    assert "load average 2.90 / 2.50 / 2.30" in timing.format_conditions(result)


def test_the_thread_count_is_set_while_timing_and_restored():
    before = torch.get_num_threads()
    seen = []
    timing.compare({"a": lambda: seen.append(torch.get_num_threads())}, rounds=2, warmup=0, threads=1,
                   load=lambda: None, cores=1)
    assert seen == [1, 1]
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs, message", [({"rounds": 0}, "rounds must be >= 1"),
                                             ({"warmup": -1}, "warmup must be >= 0"),
                                             ({"threads": 0}, "threads must be >= 1")])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        timing.compare({"a": lambda: None}, load=lambda: None, **kwargs)
