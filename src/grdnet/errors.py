"""User-facing errors: the CLI prints these as one line, without a traceback."""


class GRDNetError(Exception):
    """A problem with the user's input (a file, a folder, an option), not a bug."""
