"""Exceptions whose message is meant for the user: the CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input (data, paths, checkpoints, reward functions) explained in the message."""


class DataError(UserError, ValueError):
    """A data source or row is unusable; the message names the file, line and field (ppomax.data)."""
