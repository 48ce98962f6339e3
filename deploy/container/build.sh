#!/usr/bin/env bash
# Build the her2low-cds container image with podman, offline inside the build:
#   1. a Debian bookworm base made locally with mmdebstrap (no registry pull), imported once;
#   2. a wheelhouse of the project and its dependencies built on the host (`pip wheel`);
#   3. `podman build` with that base and wheelhouse (pip --no-index inside the build).
# Every input is hashed; an image with the same content hash is reused, not rebuilt.
#
# Usage: deploy/container/build.sh [--tag IMAGE] [--cache DIR] [--python PY] [--print-hash]
# Prints the image reference (localhost/her2low-cds:<hash>) on its last stdout line.
# Needs root (or rootless podman), podman, runc and mmdebstrap (scripts/system-deps.sh).
# The whole script is one function, read in full before it runs: editing or replacing this
# file while a build runs cannot change what that build does.
set -euo pipefail

main() {
  local here root image cache python print_hash
  here="$(cd "$(dirname "$0")" && pwd)"
  root="$(cd "$here/../.." && pwd)"
  image="localhost/her2low-cds"
  cache="${HER2LOW_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/her2low-build}"
  python="${PYTHON:-}"
  print_hash=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --tag) image="$2"; shift 2 ;;
      --cache) cache="$2"; shift 2 ;;
      --python) python="$2"; shift 2 ;;
      --print-hash) print_hash=1; shift ;;
      -h|--help) sed -n '2,12p' "$0"; return 0 ;;
      *) echo "build.sh: unknown argument $1" >&2; return 2 ;;
    esac
  done
  if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
  fi
  podman=(podman --runtime runc)

  # Debian packages of the base: Python, and DCMTK for the node's health check (echoscu) and
  # for operators (dcmdump, storescu). dicom3tools is a test-time validator only: not shipped.
  local base_packages base_hash base_image hash ref
  base_packages="python3,python3-venv,dcmtk,ca-certificates,tzdata"
  base_hash="$(printf '%s\n' "$base_packages" bookworm minbase v1 | sha256sum | cut -c1-12)"
  base_image="localhost/her2low-base:bookworm-$base_hash"

  # Content hash: the sources that go into the wheel, the build recipe, the base.
  hash="$(
    cd "$root"
    {
      find her2low dicom_node cds_service models -type f \
        ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
      sha256sum pyproject.toml README.md deploy/container/Containerfile \
        deploy/container/healthcheck.py deploy/container/build.sh
      echo "$base_image"
    } | sha256sum | cut -c1-16
  )"
  if [ "$print_hash" = 1 ]; then echo "$hash"; return 0; fi
  ref="$image:$hash"
  if "${podman[@]}" image exists "$ref"; then
    log "image $ref is up to date"
    echo "$ref"
    return 0
  fi
  mkdir -p "$cache"
  # One build at a time per cache (parallel test workers, two operators): the next one waits,
  # then finds the image built and returns at once.
  exec 9>"$cache/.lock"
  flock 9
  if "${podman[@]}" image exists "$ref"; then
    log "image $ref was built meanwhile"
    echo "$ref"
    return 0
  fi

  # 1. the base image
  if ! "${podman[@]}" image exists "$base_image"; then
    local tar="$cache/base-bookworm-$base_hash.tar"
    if [ ! -s "$tar" ]; then
      log "making the Debian base with mmdebstrap ($base_packages)"
      mmdebstrap --variant=minbase --include="$base_packages" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --format=tar bookworm "$tar.part" \
        "deb http://deb.debian.org/debian bookworm main" \
        "deb http://deb.debian.org/debian bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main" </dev/null >&2
      mv "$tar.part" "$tar"
    fi
    log "importing $tar as $base_image"
    "${podman[@]}" import "$tar" "$base_image" >&2
  fi

  # 2. the wheelhouse (dependencies are kept between builds; the project wheel is rebuilt)
  local wheels="$cache/wheels" work
  work="$(mktemp -d "$cache/build.XXXXXX")"
  # on any exit: the work folder, and the build stage's intermediate image, go
  trap 'rm -rf "'"$work"'"; podman --runtime runc image prune -f --filter label=org.her2low.stage=build >/dev/null 2>&1 || true' EXIT
  mkdir -p "$wheels" "$work/src" "$work/context"
  rm -f "$wheels"/her2low_cds-*.whl
  (cd "$root" && tar --exclude='__pycache__' --exclude='*.pyc' -cf - \
    her2low dicom_node cds_service models pyproject.toml README.md) | tar -xf - -C "$work/src"
  log "building the wheelhouse in $wheels"
  # with the scaled-mode extras: PostgreSQL (psycopg 3) and Redis, as compose and Kubernetes use
  "$python" -m pip wheel --quiet --find-links "$wheels" -w "$wheels" "$work/src[postgres,redis]" >&2
  # Requirements only the image's Python needs: Debian's 3.11.2 meets markers such as redis's
  # `async-timeout; python_full_version < "3.11.3"` that a newer host Python skips.
  "$python" -m pip wheel --quiet --find-links "$wheels" -w "$wheels" "async-timeout>=4.0.3" >&2

  # 3. the image, from a context holding only the recipe and the wheelhouse (hard links)
  cp "$here/Containerfile" "$here/healthcheck.py" "$work/context/"
  cp -al "$wheels" "$work/context/wheels" 2>/dev/null || cp -a "$wheels" "$work/context/wheels"
  log "building $ref"
  # docker format: the OCI image format has no HEALTHCHECK.
  "${podman[@]}" build --format docker --network host \
    --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
    --build-arg BASE="$base_image" --label org.her2low.content-hash="$hash" \
    -t "$ref" -t "$image:latest" -f "$work/context/Containerfile" "$work/context" >&2
  # older builds of this image (other content hashes) are superseded: free their space
  # (an image a container still uses is kept: rmi refuses it)
  local old
  "${podman[@]}" images --format '{{.Repository}}:{{.Tag}}' --filter reference="$image" |
    while read -r old; do
      case "$old" in
        "$ref"|"$image:latest") ;;
        *) "${podman[@]}" rmi "$old" >/dev/null 2>&1 || true ;;
      esac
    done
  echo "$ref"
}

log() { echo "build.sh: $*" >&2; }

main "$@"
exit $?
