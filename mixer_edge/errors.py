"""The one exception type users see: a mistake they can fix, told in one line."""


class MixerEdgeError(Exception):
    """A user-facing error: the message names the file or option and the fix.

    The CLI prints it as one line and exits non-zero; it never shows a traceback.
    """


def reason(exc: BaseException, last: bool = False) -> str:
    """Why `exc` happened, in one short line for a MixerEdgeError: its message's first (or `last`)
    non-empty line without terminal colours, at most 200 characters, or else its type's name."""
    import re

    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1 if last else 0]
    return line if len(line) <= 200 else line[:197] + "..."
