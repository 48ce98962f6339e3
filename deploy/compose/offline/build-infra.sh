#!/usr/bin/env bash
# Build the offline infrastructure image of the compose stack: PostgreSQL, Redis, Orthanc and
# nginx from Debian's packages in one image made with mmdebstrap and imported into podman, so
# that a site without a container registry runs deploy/compose.yaml with
# deploy/compose.offline.yaml (docs/deploy.md). No registry pull; Debian's archive (or a mirror)
# is the only source. The image is rebuilt only when its package list or entry points change.
#
# Usage: deploy/compose/offline/build-infra.sh [--cache DIR] [--mirror URL]
# Prints the image reference on its last stdout line and tags it localhost/her2low-infra:bookworm
# (the default of HER2LOW_INFRA_IMAGE in deploy/compose.offline.yaml).
set -euo pipefail

main() {
  local here cache mirror
  here="$(cd "$(dirname "$0")" && pwd)"
  cache="${HER2LOW_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/her2low-build}"
  mirror="${HER2LOW_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
  while [ $# -gt 0 ]; do
    case "$1" in
      --cache) cache="$2"; shift 2 ;;
      --mirror) mirror="$2"; shift 2 ;;
      -h|--help) sed -n '2,10p' "$0"; return 0 ;;
      *) echo "build-infra.sh: unknown argument $1" >&2; return 2 ;;
    esac
  done
  local podman=(podman --runtime runc)
  # pg_isready and redis-cli (the compose health checks) come with postgresql and redis-server.
  local packages="postgresql,redis-server,orthanc,nginx-light,ca-certificates,tzdata"
  local hash ref latest="localhost/her2low-infra:bookworm"
  hash="$(
    { printf '%s\n' "$packages" bookworm minbase v1; cat "$here/her2low-postgres" "$0"; } |
      sha256sum | cut -c1-12
  )"
  ref="localhost/her2low-infra:bookworm-$hash"
  if "${podman[@]}" image exists "$ref"; then
    "${podman[@]}" tag "$ref" "$latest" >&2
    echo "build-infra.sh: image $ref is up to date" >&2
    echo "$ref"
    return 0
  fi
  mkdir -p "$cache"
  exec 9>"$cache/.infra.lock"  # one build at a time; the next one finds the image built
  flock 9
  if ! "${podman[@]}" image exists "$ref"; then
    local tar="$cache/infra-bookworm-$hash.tar"
    if [ ! -s "$tar" ]; then
      echo "build-infra.sh: making the infrastructure image with mmdebstrap ($packages)" >&2
      # customize hooks: the PostgreSQL entry point, and no Debian default site on nginx's port
      # 80 (deploy/nginx/her2low.conf is the only server)
      mmdebstrap --variant=minbase --include="$packages" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook="copy-in $here/her2low-postgres /usr/local/bin" \
        --customize-hook='chmod 0755 "$1/usr/local/bin/her2low-postgres"' \
        --customize-hook='rm -f "$1/etc/nginx/sites-enabled/default"' \
        --format=tar bookworm "$tar.part" \
        "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
        "deb ${mirror%/debian}/debian-security bookworm-security main" </dev/null >&2
      mv "$tar.part" "$tar"
    fi
    "${podman[@]}" import "$tar" "$ref" >&2
    rm -f "$tar"  # the image holds it now
  fi
  "${podman[@]}" tag "$ref" "$latest" >&2
  echo "$ref"
}

main "$@"
exit $?
