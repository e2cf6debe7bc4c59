"""Stand-ins and checks several test modules share."""
from __future__ import annotations


def no_plots(folder, *args, **kwargs):
    """Stands in for the report writer: its plots take most of a tiny run's time and are not what the
    tests that use it are about."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.md").write_text("report\n")
    return folder / "report.md"


def one_error_line(err: str) -> str:
    """The stderr of a failed command: exactly one line, ``cxrlab: error: ...``, no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.strip().splitlines() if line.startswith("cxrlab: error: ")]
    assert len(errors) == 1, err
    return errors[0]
