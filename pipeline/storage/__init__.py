"""Storage: filesystem paths (local, file://, s3://, gs://, http(s):// for reading), the sample format,
the tar writer, per-shard commits with their records, dataset-level files, resharding and verification."""
