#!/usr/bin/env bash
# Print "PID COMMAND" for every running process of this checkout's system: `her2low`,
# `python -m dicom_node|cds_service|her2low` and gunicorn, started from this checkout (its .venv
# in the command line, or its folder as the working directory). Zombies are left out; so is
# anything else of the machine (another checkout, a developer's editor, this script).
# Used by scripts/test.sh to fail a test run that leaves processes behind.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd -P)
for proc in /proc/[0-9]*; do
  pid=${proc#/proc/}
  [ "$pid" = "$$" ] && continue
  cmd=$({ tr '\0' ' ' < "$proc/cmdline"; } 2>/dev/null) || continue
  [ -n "$cmd" ] || continue
  case "$cmd" in
    *" -m her2low"*|*" -m dicom_node"*|*" -m cds_service"*|*/bin/her2low\ *|*gunicorn*) ;;
    *) continue ;;
  esac
  cwd=$(readlink "$proc/cwd" 2>/dev/null || true)
  case "$cmd|$cwd/" in
    *"$here/"*) ;;
    *) continue ;;
  esac
  state=$({ sed 's/.*) //' "$proc/stat" | cut -d' ' -f1; } 2>/dev/null) || continue
  [ "$state" = Z ] && continue
  echo "$pid $cmd"
done
exit 0
