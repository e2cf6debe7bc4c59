"""One error type for bad user input, and the 'did you mean' helper every lookup uses."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class CxrlabError(ValueError):
    """Bad input from the user: a file, row, field, key or name that cannot be used.

    The message always names the offending item so the user can fix it without a traceback hunt.
    """


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The valid choice closest to a misspelt ``name`` (case-insensitive), or None."""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.5)
    return lowered[match[0]] if match else None


def unknown(kind: str, name: str, choices: Iterable[str]) -> CxrlabError:
    """A CxrlabError for an unknown ``kind`` called ``name``, suggesting the closest valid one."""
    choices = sorted(choices)
    hint = closest(name, choices)
    msg = f"unknown {kind} {name!r}"
    if hint:
        msg += f"; did you mean {hint!r}?"
    msg += f" (valid: {', '.join(choices)})"
    return CxrlabError(msg)
