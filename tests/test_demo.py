"""m2d-demo's command line: bad values are one line naming the flag, exit status 2 (as m2d-train)."""

from __future__ import annotations

import pytest

from m2d_kernels import demo


@pytest.mark.parametrize("argv, message", [
    (["--dims", "64,32"], "--dims must be strictly increasing positive ints, got 64,32"),
    (["--dims", "32,,64"], "argument --dims: expected comma-separated integers, got '32,,64'"),
    (["--dims", "32", "64"], "--dims takes one comma-separated list: --dims 32,64, not --dims 32 64"),
    (["--dims", "32,512"], "--dims: 512 is larger than --features 384"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--batch", "-1"], "--batch must be >= 1, got -1"),
    (["--negatives", "-1"], "--negatives must be >= 0, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
])
def test_bad_values_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"m2d-demo: error: {message}")


def test_every_option_has_help():
    for action in demo.build_parser()._actions:
        assert action.help, action.option_strings


def test_comma_separated_dims_are_parsed_in_order():
    args = demo.build_parser().parse_args(["--dims", "8, 16,32"])
    assert args.dims == [(8, 16, 32)]
