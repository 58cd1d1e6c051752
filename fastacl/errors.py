"""fastacl's own errors: bad input that a user can fix.

The `fastacl` command prints these as one sentence with exit code 2 and no traceback; every
other exception keeps its traceback (it is a bug, not bad input). Each class also derives from
the built-in exception a caller would expect (ValueError, FileNotFoundError, ...), so
`except ValueError` keeps working.
"""

from __future__ import annotations


class FastaclError(Exception):
    """Base class: a problem with the user's input, named with its fix."""


class ConfigError(FastaclError, ValueError):
    """A config field, option or argument has a bad value."""


class MissingFileError(FastaclError, FileNotFoundError):
    """A file fastacl needs (a dataset split, a checkpoint) is not where it was told to look."""


class RunDirError(FastaclError, FileExistsError):
    """The run directory cannot be used as asked (it already holds a run, or holds none)."""


class BadFileError(FastaclError, ValueError):
    """A file is there but is not what fastacl expected (corrupt, truncated, another format)."""


class BackendError(FastaclError, RuntimeError):
    """A forced backend (FASTACL_BACKEND, use_backend) cannot run here."""
