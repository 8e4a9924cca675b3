"""State: the RocksDB-backed results table (and, later, the MongoDB store). No PyTorch here."""
