"""The feature store: Zarr v3 arrays plus a Parquet manifest, self-describing and verifiable.

from store import open_store
s = open_store("stores/hmdb51")
rows = s.select(split="test")
cls = s.read(rows, ["cls/layer12"])["cls/layer12"]    # (n, V, T, D) float16
"""

from .errors import (
    CorruptStoreError,
    NotAStoreError,
    SchemaVersionError,
    SpecMismatchError,
    StoreError,
    StoreLockedError,
)
from .featurestore import FeatureStore, create_store, open_store
from .layout import (
    SCHEMA_VERSION,
    SPEC_IDENTITY_FIELDS,
    checksum_column,
    cls_name,
    default_layers,
    layer_in_name,
    row_tensors,
    spec_differences,
    token_name,
)
from .reading import checksum
from .verification import Problem
from .writing import ChunkWriter, done_update

__all__ = [
    "SCHEMA_VERSION",
    "SPEC_IDENTITY_FIELDS",
    "ChunkWriter",
    "CorruptStoreError",
    "FeatureStore",
    "NotAStoreError",
    "Problem",
    "SchemaVersionError",
    "SpecMismatchError",
    "StoreError",
    "StoreLockedError",
    "checksum",
    "checksum_column",
    "cls_name",
    "create_store",
    "default_layers",
    "done_update",
    "layer_in_name",
    "open_store",
    "row_tensors",
    "spec_differences",
    "token_name",
]
