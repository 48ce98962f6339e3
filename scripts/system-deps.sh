#!/usr/bin/env bash
# Debian packages the tests use as real peers: DCMTK, Orthanc, dicom3tools (dciodvfy), Node/npm
# (to fetch the official FHIR R4 JSON schema). Installs only what is missing; needs root.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${need[*]} (run as root or install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
