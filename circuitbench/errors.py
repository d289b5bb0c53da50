"""User-facing errors.

A `UserError` is a mistake the user can fix (unknown model, bad file, impossible sparsity). The
CLI prints its message as one line and exits with code 2; it never shows a traceback for it.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one clear line (exit code 2)."""

    exit_code = 2


class UnsupportedModel(UserError):
    """A model of a family circuitbench has no adapter for: wrong on every machine, so even a dry
    run (which only warns about models this machine cannot load) refuses it."""
