"""User-facing errors.

A :class:`PeftmergeError` is bad input the user can fix: the CLI prints its message on one line
and exits with code 2 (no traceback unless ``--debug``). Everything else is a bug.
"""


class PeftmergeError(Exception):
    """Bad input or a refused operation. The message names the file or value and says what to do."""



def did_you_mean(name, valid) -> str:
    """`` (did you mean 'ties'?)`` for a name close to one of ``valid``, else ``""``: the end of an unknown-name
    error."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
