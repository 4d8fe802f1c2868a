#!/usr/bin/env bash
# Build the CPU image (docker/Dockerfile, unchanged) with Podman on a machine like this project's CI:
# no registry, no PyTorch download index, a TLS-intercepting CA. Only build arguments and build-time mounts
# differ from a build in the wild (docker/README.md "Building").
#
#   scripts/build_image.sh            # -> localhost/samseg:cpu (override with IMAGE=...)
#   IIDFILE=path scripts/build_image.sh   # also writes the image ID there
#   EXTRA_BUILD_ARGS=--no-cache LOCAL_INDEXES= scripts/build_image.sh   # a cold build from PyPI alone
#
# Steps, each skipped when already done:
#   1. podman/buildah/runc/mmdebstrap: installed with apt-get when missing (root only);
#   2. CONTAINERS_CONF: scripts/podman/containers.conf unless set (runc + cgroupfs, rlimits this host allows);
#   3. the base image BASE_IMAGE (localhost/python:3.11-slim-bookworm): a stand-in for Docker Hub's
#      python:3.11-slim-bookworm made with mmdebstrap from Debian bookworm, kept in local storage;
#   4. podman build --format docker (keeps HEALTHCHECK) with the CA bundle mounted into every RUN step and,
#      where this machine has them, its local wheel indexes (torch 2.14.1 and its CUDA wheels: ~2.7 GB that
#      would otherwise come from PyPI) mounted read-only, never copied into a layer.
# Layer caching is Podman's: a second run with unchanged inputs takes seconds.
#
# Exit status: 0 built; 3 no container engine and none can be installed here (scripts/test.sh then lets the
# container tests skip); anything else is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/samseg:cpu}
BASE_IMAGE=${BASE_IMAGE:-localhost/python:3.11-slim-bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
# Local PEP 503 indexes on this project's machines (`pip config list`); LOCAL_INDEXES= builds from PyPI only.
LOCAL_INDEXES=${LOCAL_INDEXES-/opt/pypi /opt/pypi-more}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/podman/containers.conf}

say() { echo "build_image: $*" >&2; }

# --- 1. the tools ---------------------------------------------------------------------------------------------
need=()
for tool in podman buildah runc; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
if [ "$BASE_IMAGE" = localhost/python:3.11-slim-bookworm ] && ! command -v mmdebstrap >/dev/null 2>&1; then
  need+=(mmdebstrap)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "missing ${need[*]} and cannot install them (needs root and apt-get)"
    exit 3
  fi
  say "installing ${need[*]} (apt-get)"
  if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    podman buildah runc mmdebstrap uidmap fuse-overlayfs slirp4netns containernetworking-plugins iptables \
    ca-certificates) >/tmp/samseg-build-image-apt.log 2>&1; then
    say "apt-get failed (log: /tmp/samseg-build-image-apt.log)"
    exit 3
  fi
fi

# --- 2./3. the base image -------------------------------------------------------------------------------------
# A broken Podman setup (a bad CONTAINERS_CONF, no runtime) stops here rather than looking like a missing image.
if ! info_err=$(podman info 2>&1 >/dev/null); then
  say "podman does not work here (CONTAINERS_CONF=$CONTAINERS_CONF): ${info_err##*$'\n'}"
  exit 1
fi
if podman image exists "$BASE_IMAGE"; then
  say "base image $BASE_IMAGE present"
elif [ "$BASE_IMAGE" = localhost/python:3.11-slim-bookworm ]; then
  # Debian's python3 (3.11.2) with venv and pip's TLS needs; passwd for groupadd/useradd (python:slim has it).
  say "making $BASE_IMAGE with mmdebstrap (~30 s)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  sources=/etc/apt/sources.list.d/debian.sources
  [ -f "$sources" ] || sources=/etc/apt/sources.list
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
    bookworm "$tmp/rootfs.tar" - <"$sources"
  podman import --change 'CMD ["python3"]' "$tmp/rootfs.tar" "$BASE_IMAGE" >/dev/null
  rm -rf "$tmp"
  trap - EXIT
else
  podman pull "$BASE_IMAGE"
fi

# --- 4. the build ---------------------------------------------------------------------------------------------
args=(--format docker --layers -f docker/Dockerfile -t "$IMAGE" --build-arg "PYTHON_IMAGE=$BASE_IMAGE")
[ -n "${IIDFILE:-}" ] && args+=(--iidfile "$IIDFILE")  # the built image's ID (scripts/test.sh uses it)
[ -f "$CA_BUNDLE" ] && args+=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
indexes=()
for dir in $LOCAL_INDEXES; do [ -d "$dir/simple" ] && indexes+=("$dir"); done
if [ ${#indexes[@]} -gt 0 ]; then
  # pip in the build reads /etc/pip.conf: these indexes join the one each RUN names. pip's resolver prefers the
  # last index among equal candidates, so torch 2.14.1 and its CUDA wheels come from this disk (an extra index,
  # found after PyPI); what is not here (cuda-bindings, the newest pins) still comes from PyPI.
  conf=$(mktemp)
  trap 'rm -f "$conf"' EXIT
  extra=""
  for dir in "${indexes[@]}"; do
    args+=(-v "$dir:$dir:ro")
    extra+=" file://$dir/simple"
  done
  printf '[global]\nextra-index-url =%s\n' "$extra" >"$conf"
  chmod 644 "$conf"
  args+=(-v "$conf:/etc/pip.conf:ro")
fi
# PyTorch's own index is unreachable here; PyPI's torch==2.14.1 is the same (CUDA 13.0) build.
args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}")

# EXTRA_BUILD_ARGS: more `podman build` options, split on spaces (e.g. --no-cache).
read -r -a extra_args <<<"${EXTRA_BUILD_ARGS:-}"
args+=(${extra_args[@]+"${extra_args[@]}"})

say "podman build ${args[*]} ."
start=$(date +%s)
podman build "${args[@]}" .
say "built $IMAGE in $(($(date +%s) - start)) s; size $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
