"""The feature store: Zarr v3 arrays plus a Parquet manifest, self-describing and verifiable."""
