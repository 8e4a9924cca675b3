#!/usr/bin/env bash
# The test suite: installs what is missing, then runs every test. The tests start their own
# Kafka-protocol broker (Tansu), worker processes and image server. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
exec .venv/bin/python -m pytest "$@"
