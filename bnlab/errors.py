"""Errors a user can cause: shown as one line, never a traceback."""


class UserError(Exception):
    """Bad input (config value, data files, run directory): one clear line and a non-zero exit."""


class DataError(UserError):
    """A data set is missing, corrupt or cannot be downloaded."""
