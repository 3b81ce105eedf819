"""User-facing errors: one line naming the bad field and how to fix it; entry points exit 2."""

from __future__ import annotations

import errno
import functools
import sys

# OS errors that are the user's to fix (a folder they cannot write, a full disk), wherever they surface
_USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


class UserError(Exception):
    """A problem with the user's input (config, paths, files). Printed as one line, exit code 2."""

    def __init__(self, field: str, message: str, fix: str | None = None):
        self.field, self.message, self.fix = field, message, fix
        text = f"{field}: {message}"
        if fix:
            text += f" (fix: {fix})"
        super().__init__(" ".join(text.split()))  # one line, whatever a message quoted


def from_os_error(e: OSError) -> UserError:
    """A permission / read-only / disk-full error the checks up front could not foresee (a folder
    made read-only mid-run, a quota), as one line naming the path."""
    where = e.filename or "a file"
    return UserError(
        str(where),
        e.strerror or str(e),
        "free disk space"
        if e.errno in (errno.ENOSPC, errno.EDQUOT)
        else "make it writable by this user, or choose another folder",
    )


class JobFailed(Exception):
    """The job ran but its results are incomplete (e.g. a grid cell with no finished trial): what
    was produced is written, the message says what is missing, and the entry point exits 1."""


def exits_cleanly(main):
    """Decorate a `main(argv) -> int`: a UserError (or a permission / disk-full OSError) becomes one
    line on stderr and exit code 2, a JobFailed one line and exit code 1."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except JobFailed as e:
            print(f"failed: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            if e.errno not in _USER_ERRNOS:
                raise
            print(f"error: {from_os_error(e)}", file=sys.stderr)
            return 2

    return wrapper
