"""Errors a user sees: one line, naming the file, tensor or option and the fix.

ConvertError -> exit 2 (bad usage or input); Mismatch -> exit 1 (verify found a difference).
"""


class ConvertError(Exception):
    """A user-facing failure: bad input, bad option, I/O problem. Exit code 2."""

    exit_code = 2


class Mismatch(Exception):
    """verify found data or structure that differs from what it should be. Exit code 1."""

    exit_code = 1
