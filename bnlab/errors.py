"""Errors a user can cause: shown as one line, never a traceback."""


class UserError(Exception):
    """Bad input (config value, data files, run directory): one clear line and a non-zero exit."""


class DataError(UserError):
    """A data set is missing, corrupt or cannot be downloaded."""


class WriteError(Exception):
    """A run's file could not be written (no space left, no permission): the run stops as
    ``failed`` with one line naming the file and the operating system's reason."""

    def __init__(self, path: object, err: OSError) -> None:
        self.path, self.os_error = path, err
        reason = err.strerror or str(err)
        code = f" [{errno_name(err.errno)}]" if err.errno else ""
        super().__init__(f"cannot write {path}: {reason}{code}")


def errno_name(number: int) -> str:
    import errno

    return errno.errorcode.get(number, str(number))
