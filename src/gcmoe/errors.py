"""Exceptions raised for problems a user can fix. Each message names the file or value and what to do."""

from __future__ import annotations


class GcmoeError(Exception):
    """Base class of every error gcmoe raises on purpose."""


class InvalidSampleError(GcmoeError, ValueError):
    """A Sample's cells, counts, coordinates, image or pixel size are not usable."""


class ImageReadError(GcmoeError, OSError):
    """An image file is missing, truncated or in a format that cannot be read."""


class ConfigError(GcmoeError, ValueError):
    """A setting is unknown, of the wrong type or out of range."""


class UnknownNameError(GcmoeError, KeyError):
    """A registry (encoders, models) was asked for a name it does not hold."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class FeatureCacheError(GcmoeError, OSError):
    """A feature cache entry is corrupt or does not match the sample and encoder it is keyed by."""


class OutputExistsError(GcmoeError, FileExistsError):
    """An output path is taken by something gcmoe did not write (or by a file where a folder is needed)."""


class TrainingError(GcmoeError, RuntimeError):
    """Training cannot go on: too few cells, or a loss, statistic or score that is not finite."""
