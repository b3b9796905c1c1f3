"""User-facing errors.

A :class:`PeftmergeError` is bad input the user can fix: the CLI prints its message on one line
and exits with code 2 (no traceback unless ``--debug``). Everything else is a bug.
"""


class PeftmergeError(Exception):
    """Bad input or a refused operation. The message names the file or value and says what to do."""
