"""The data layer's errors: each message says what is wrong and what to do."""

from __future__ import annotations

from mnist_resnet.errors import UserError


class DataError(UserError):
    """Data a user supplied or asked for is missing or wrong; the message says what to do."""


class IDXError(DataError):
    """An IDX file breaks the format; the message names the file and the problem."""


class DataUnavailable(DataError):
    """Every source failed; the message lists each one and how to place the files by hand."""
