"""The ``python -m streamkit demo`` showcase, run in this process."""

from __future__ import annotations

import asyncio

import pytest

from streamkit import demo


def summary_of(output: str) -> dict[str, str]:
    """The ``name   value`` lines at the end of the demo's output."""
    lines = output.splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("frames sent"))
    return {
        name.strip(): value
        for name, value in (line.rsplit(None, 1) for line in lines[start:] if line.strip())
    }


def test_every_echo_comes_back_exactly_once_through_the_cuts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert demo.main(["--frames", "3000", "--cut-every", "0.01", "--seed", "5"]) == 0
    out, err = capsys.readouterr()
    summary = summary_of(out)
    assert summary["frames sent"] == summary["echoes received"] == "3000"
    assert summary["lost"] == "0"
    assert summary["in order, exactly once"] == "yes"
    assert int(summary["connections cut"]) >= 1
    assert int(summary["reconnects"]) >= 1
    assert "duplicates dropped" in summary and "frames replayed" in summary
    assert "FAILED" not in err


def test_gives_up_by_itself_and_says_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A demo that cannot finish fails with one line on stderr instead of hanging."""

    async def never_done(*args: object) -> int:
        await asyncio.Event().wait()
        return 0

    monkeypatch.setattr(demo, "_run", never_done)
    monkeypatch.setattr(demo, "_time_limit", lambda frames: 0.05)
    assert demo.main(["--frames", "10"]) == 1
    assert capsys.readouterr().err == "demo FAILED: timed out after 0.05 s with 0/10 echoed\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--frames", "0"], "'0' is not a number >= 1"),
        (["--frames", "many"], "'many' is not a number >= 1"),
        (["--cut-every", "fast"], "'fast' is not a number of seconds"),
        (["--cut-every", "0"], "'0' is not a number of seconds"),
        (["--seed", "x"], "invalid int value: 'x'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("python -m streamkit demo: error: ")
    assert message in error
