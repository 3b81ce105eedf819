"""User-facing errors: one line naming the bad field and how to fix it; entry points exit 2."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input (config, paths, files). Printed as one line, exit code 2."""

    def __init__(self, field: str, message: str, fix: str | None = None):
        self.field, self.message, self.fix = field, message, fix
        text = f"{field}: {message}"
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)


class JobFailed(Exception):
    """The job ran but its results are incomplete (e.g. a grid cell with no finished trial): what
    was produced is written, the message says what is missing, and the entry point exits 1."""


def exits_cleanly(main):
    """Decorate a `main(argv) -> int`: a UserError becomes one line on stderr and exit code 2, a
    JobFailed one line and exit code 1."""

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

    return wrapper
