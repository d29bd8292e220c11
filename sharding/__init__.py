"""Image sources -> WebDataset tar shards + parquet manifest; the streaming reader; verification."""
