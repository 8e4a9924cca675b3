"""The results table: one `AdResult` per ad id, RocksDB-backed, partitioned like the topics.

Written only through `agents/results.py`'s `ResultsRecorder` (by the results stage, and by the
download stage for the outcomes it folds where they are), each read and write of a key in one
step of the event loop; `tables/merge.py` is its update rule.
"""

from __future__ import annotations

from classify_app.application import app
from classify_app.records import AdResult

# RocksDB, per partition: Faust's defaults (3 write buffers of 64 MB, a 2 GB block cache) let
# a worker with 8 partitions grow by gigabytes as results accumulate. These bound it to about
# 8 x (2 x 8 + 16) MB; MongoDB is the store of record for anything older.
ROCKSDB_OPTIONS = {
    "write_buffer_size": 8 * 2**20,
    "max_write_buffer_number": 2,
    "block_cache_size": 16 * 2**20,
}

results_table = app.Table(
    "ad-results",
    key_type=str,
    value_type=AdResult,
    partitions=app.settings.partitions,
    help="Classification result per ad id.",
    options=dict(ROCKSDB_OPTIONS),
)
