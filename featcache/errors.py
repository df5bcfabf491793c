"""Error types. Every user-facing failure is a FeatcacheError whose message is one line saying what to do."""

from __future__ import annotations


class FeatcacheError(Exception):
    """Base class: the CLI prints the message and exits with code 1."""


class ManifestError(FeatcacheError):
    """A dataset manifest is missing or malformed."""


class DataError(FeatcacheError):
    """Dataset files are missing, partial or unreadable."""


class BackboneError(FeatcacheError):
    """A backbone id cannot be resolved or loaded."""


class StoreError(FeatcacheError):
    """A feature store is missing, incomplete or does not match what was asked for."""


class FingerprintMismatch(StoreError):
    """A store was made by a different backbone, preprocessing, dataset or featcache version."""
