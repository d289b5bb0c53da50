"""User-facing errors.

A `UserError` is a mistake the user can fix (unknown model, bad file, impossible sparsity). The
CLI prints its message as one line and exits with code 2; it never shows a traceback for it.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear line (exit code 2)."""

    exit_code = 2
