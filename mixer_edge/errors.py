"""The one exception type users see: a mistake they can fix, told in one line."""


class MixerEdgeError(Exception):
    """A user-facing error: the message names the file or option and the fix.

    The CLI prints it as one line and exits non-zero; it never shows a traceback.
    """
