"""Errors a user sees: one line, naming the file, tensor or option and the fix.

ConvertError -> exit 2 (bad usage or input). verify's differences are not errors: its report lists
them, and the command exits 1.
"""


class ConvertError(Exception):
    """A user-facing failure: bad input, bad option, I/O problem. Exit code 2."""

    exit_code = 2


class WorldSizeError(ConvertError):
    """A world size the model cannot be split into for a layout; carries the valid ones."""

    def __init__(self, N: int, layout: str, valid: list[int], constrains: str):
        self.N, self.layout, self.valid = N, layout, list(valid)
        super().__init__(f"world size {N} does not divide this model for the {layout} layout ({constrains}); "
                         f"valid world sizes: {', '.join(map(str, self.valid))}")
