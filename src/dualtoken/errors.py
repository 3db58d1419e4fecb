"""Typed errors: the CLI prints them as one line (exit code 2), the server turns them into a 4xx."""

from __future__ import annotations


class DualTokenError(Exception):
    """Base class of every error this package raises on bad input."""


class ConfigError(DualTokenError, ValueError):
    """A config is malformed: unknown key, wrong type, impossible combination, unknown name."""


class ImageError(DualTokenError, ValueError):
    """An image (file or tensor) is unreadable or has the wrong size, channels, dtype or value range."""


class CodesError(DualTokenError, ValueError):
    """Token codes have the wrong shape, dtype or values out of the codebook's range."""


class CheckpointError(DualTokenError, ValueError):
    """A checkpoint is missing, corrupt, or belongs to another config."""


class DamagedInstallError(CheckpointError):
    """A file of a model embedded in the installed package is missing or corrupted; reinstalling the package fixes it."""


class DataError(DualTokenError, ValueError):
    """A data set, token file or conversation file is malformed."""
