"""The CLI's contract for bad input, checked the same way by every test file that needs it."""
from __future__ import annotations


def one_error_line(res, code: int, *needles: str) -> str:
    """The command exited with ``code``, printed no traceback and exactly one ``error:`` line, which
    contains every one of ``needles``; returns that line."""
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
