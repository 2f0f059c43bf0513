#!/usr/bin/env bash
# Install everything the tests need (Python packages; Orthanc and DCMTK from Debian when root),
# then run the linters and the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
.venv/bin/ruff check aggregator connectors fixtures tests bench
.venv/bin/mypy
exec .venv/bin/pytest "$@"
