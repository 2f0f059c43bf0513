#!/usr/bin/env bash
# Install the aggregator into ./.venv and run a whole case on the built-in synthetic data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/aggregator demo "$@"
