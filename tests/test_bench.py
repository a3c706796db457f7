"""`python -m broker.bench writer` runs, and its raw loop still runs the command's statements."""

from __future__ import annotations

import pytest

from broker.bench import main


def test_bench_writer_compares_same_statements(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The writer benchmark compares the same statements."""
    # The benchmark refuses (exit 1) when the raw apsw loop and a trace of
    # SendChannelMessage differ, so a change to the send path that is not
    # mirrored in the raw loop fails here rather than in a report.
    code = main(["writer", "--sends", "300", "--rounds", "1", "--concurrency", "32",
                 "--synchronous", "OFF"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "ratio: " in out.out
    assert "statements of a sender's first two sends in a transaction: 14 " in out.out


def test_bench_limits_measures_both_kinds_of_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["limits", "--calls", "200", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["in-process", "shared"]
    assert all("socket admitted and released" in line for line in lines[1:])
