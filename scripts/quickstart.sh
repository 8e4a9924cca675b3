#!/usr/bin/env bash
# The quick start: installs what is missing, then runs an embedded broker, a worker and a few
# sample ads, and prints their results. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh local
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=134217728:glibc.malloc.arena_max=1}"
exec .venv/bin/python -m classify_app.dev.quickstart "$@"
