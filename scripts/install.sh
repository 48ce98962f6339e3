#!/usr/bin/env bash
# Create .venv and install her2low-cds into it (add "test" as $1 for the test extras), with the
# scaled-mode drivers (psycopg 3, redis) so that a postgresql:// or redis:// URL just works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "test" ]; then
  .venv/bin/python -m pip install --quiet -e ".[test,postgres,redis]"
else
  .venv/bin/python -m pip install --quiet -e ".[postgres,redis]"
fi
