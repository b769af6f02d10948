"""The two kinds of failure the command line turns into one line and an exit code.

Every module raises its own subclass (ConfigError, DataError, CheckpointError, ...), so the CLI
catches these two without importing the modules that raise them.
"""

from __future__ import annotations

import unicodedata


class UserError(Exception):
    """Something the user can fix (a flag, a file, missing data); the message says what. Exit 2."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the work cleanly; the message says how to continue. Exit 130."""


class TrainingError(UserError):
    """Training cannot continue (non-finite loss, unusable run directory, ...)."""


class TrainingInterrupted(Interrupted):
    """Ctrl-C or SIGTERM: a checkpoint was written; the message says how to resume."""


def printable(text: str) -> str:
    """`text` safe to show inside one line of a terminal or a log: control characters
    (newlines, carriage returns, ANSI escapes), invisible format characters (bidi overrides)
    and lone surrogates (undecodable bytes of a file name) written as escapes (`\\n`, `\\x1b`,
    `\\u202e`, `\\udcff`), so a name can neither split a line nor drive the terminal."""
    return "".join(
        ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        if unicodedata.category(ch) in _HIDDEN
        else ch
        for ch in text
    )


# Unicode categories: control, format, surrogate, private use, unassigned, line/para separators.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
