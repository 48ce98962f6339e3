#!/usr/bin/env bash
# The test command: install everything the tests need, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/install.sh test
if [ -f scripts/fetch-fhir-schema.sh ]; then bash scripts/fetch-fhir-schema.sh; fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/lint-imports
# Processes of this checkout already running (a developer's `her2low up`) are not the suite's.
before=" $(bash scripts/project-processes.sh | cut -d' ' -f1 | tr '\n' ' ') "
set +e
.venv/bin/pytest -n 2 --dist loadgroup -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
# Every test must stop what it started, on failure too: a node, worker or service left running
# fails the run (after a grace period for processes still shutting down), and is then ended.
survivors() { bash scripts/project-processes.sh | while read -r pid cmd; do
  case "$before" in *" $pid "*) ;; *) echo "$pid $cmd" ;; esac; done; }
for _ in $(seq 20); do
  left=$(survivors)
  [ -z "$left" ] && break
  sleep 0.5
done
if [ -n "$left" ]; then
  echo "the test run left these project processes running:" >&2
  echo "$left" | sed 's/^/  /' >&2
  echo "$left" | cut -d' ' -f1 | xargs -r kill -TERM 2>/dev/null || true
  sleep 3
  echo "$left" | cut -d' ' -f1 | xargs -r kill -KILL 2>/dev/null || true
  exit 1
fi
exit "$rc"
