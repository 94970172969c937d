"""Storage errors. sqlite3 and OS errors are translated here, once, where they enter.

StorageError
├── BlobMissing      the blob is not in this node's store
├── BlobCorrupt      bytes do not match their sha256 / size
├── BlobTooLarge     an ingest went over the size limit
└── SchemaError      a migration could not be applied / unknown newer schema
"""

from __future__ import annotations

__all__ = ["BlobCorrupt", "BlobMissing", "BlobTooLarge", "SchemaError", "StorageError"]


class StorageError(Exception):
    """Base of storage failures."""


class BlobMissing(StorageError):
    """The requested blob is not present in this node's store."""


class BlobCorrupt(StorageError):
    """Stored or received bytes do not match the expected sha256 or size."""


class BlobTooLarge(StorageError):
    """An ingest exceeded its byte limit; nothing was stored."""


class SchemaError(StorageError):
    """The database schema cannot be brought to the version this code expects."""
