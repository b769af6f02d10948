"""The two kinds of failure the command line turns into one line and an exit code.

Every module raises its own subclass (ConfigError, DataError, CheckpointError, ...), so the CLI
catches these two without importing the modules that raise them.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix (a flag, a file, missing data); the message says what. Exit 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the work cleanly; the message says how to continue. Exit 130."""


class TrainingError(UserError):
    """Training cannot continue (non-finite loss, unusable run directory, ...)."""


class TrainingInterrupted(Interrupted):
    """Ctrl-C or SIGTERM: a checkpoint was written; the message says how to resume."""
