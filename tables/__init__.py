"""State: the RocksDB-backed results table (`results`, its update rule in `merge`) and the
MongoDB store of record (`store`, written by `writer`, its schema in `migrations`).
No PyTorch here; only `results` imports the app."""
