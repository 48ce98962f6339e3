#!/usr/bin/env bash
# The start command: install her2low-cds and start node, worker and service with the demo study.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/her2low up "$@"
