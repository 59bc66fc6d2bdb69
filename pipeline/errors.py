"""The one error type for bad input: its message names the file, tensor or option at fault."""


class InputError(Exception):
    """Bad input (source checkpoint, options, output folder). The CLI prints it and exits 2."""
