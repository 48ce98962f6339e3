#!/usr/bin/env bash
# The test command: install everything the tests need, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/install.sh test
if [ -f scripts/fetch-fhir-schema.sh ]; then bash scripts/fetch-fhir-schema.sh; fi
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/lint-imports
set +e
.venv/bin/pytest -n 2 --dist loadgroup -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
