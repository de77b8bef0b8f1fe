"""Errors raised by the toolkit.

Every failure a user can cause (bad input, damaged files, missing models)
raises a subclass of :class:`ToolkitError`; the ``codec`` command prints it
as one line and exits non-zero.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """Base class of every error the toolkit raises on purpose."""

    exit_code = 1


class FormatError(ToolkitError):
    """A file is not a .tkz file, or its structure is damaged."""

    exit_code = 3


class ChecksumError(FormatError):
    """A chunk CRC or the digest of the decoded content does not match."""

    exit_code = 4


class ModelMismatchError(ToolkitError):
    """The model named in a file is missing or differs from the one that coded it."""

    exit_code = 5


class EnvironmentMismatchError(ToolkitError):
    """A file records an environment (library versions, CPU) that changes its codec's numbers."""

    exit_code = 5


class UnsupportedInputError(ToolkitError):
    """The input cannot be handled by the chosen codec or operation."""

    exit_code = 2


class UnknownCodecError(ToolkitError):
    """A codec name is not registered."""

    exit_code = 2


class ConfigError(ToolkitError):
    """A configuration value is missing, unknown or out of range."""

    exit_code = 2


class OutputError(ToolkitError):
    """The output cannot be written (exists, unwritable, disk full)."""

    exit_code = 6


class InputError(ToolkitError):
    """An input file is missing or unreadable."""

    exit_code = 2


class DependencyError(ToolkitError):
    """An optional library a feature needs is not installed; the message names the extra."""

    exit_code = 2
