#!/usr/bin/env bash
# One command: install (if needed), lint, type-check and run the whole test suite, tier by tier: tests/unit
# (in-process), tests/integration (moto, one stack), tests/system (chaos, faults, scale-out, packaging,
# compose); the last two each with their mostly-waiting tests in a second lane (run_in_lanes). A failing tier
# stops the run before the next, slower one. CI runs exactly this.
# With arguments, pytest runs just those (`scripts/test.sh tests/unit/test_masks.py -k png`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
# The compose-file tests need a compose client; Debian's docker-compose validates files offline.
if ! command -v docker-compose >/dev/null 2>&1 && ! docker compose version >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose) >/dev/null 2>&1 \
      || echo "warning: could not install docker-compose; compose validation tests will be skipped"
  fi
fi
# kubectl renders deploy/kubernetes with the real kustomize (tests/integration/test_kubernetes_manifests.py compares
# it with the test's own renderer; without kubectl that comparison is skipped).
if ! command -v kubectl >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -qq --no-install-recommends kubectl >/dev/null 2>&1 \
    || echo "warning: could not install kubectl; the kustomize comparison will be skipped"
fi
# torch.compile's CPU backend (inductor) compiles C++ at run time: the SAMSEG_AMG_COMPILE test needs g++.
if ! command -v g++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -qq --no-install-recommends g++ >/dev/null 2>&1 \
    || echo "warning: could not install g++; the compiled-transformer test will be skipped"
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# The production image, built once per run before pytest (Podman's layer cache: unchanged inputs rebuild in
# seconds); tests/system/test_containers.py runs the dev stack's services from it and never builds.
# BUILD_IMAGE=0 skips this (the container test then skips too). Exit 3 = no container engine can be had here.
# The test gets the built image's ID, not the tag: another checkout building on this machine may move the tag.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/scripts/podman/containers.conf}
if [ "${BUILD_IMAGE:-1}" != 0 ]; then
  rc=0
  iidfile=$(mktemp)
  IIDFILE=$iidfile scripts/build_image.sh || rc=$?
  case $rc in
    0)
      TEST_CONTAINER_IMAGE=$(sed 's/^sha256://' "$iidfile")
      export TEST_CONTAINER_IMAGE TEST_CONTAINERS=required  # built: a skipped container test would now be a failure
      ;;
    3) echo "warning: no container engine here; tests/system/test_containers.py will be skipped" >&2 ;;
    *) exit "$rc" ;;
  esac
  rm -f "$iidfile"
fi
if [ "$#" -gt 0 ]; then
  exec .venv/bin/pytest "$@"
fi

# Run tests/$1 in two lanes at once: lane 2 is the files named after it, lane 1 the rest of the tier. Lane 2
# takes tests that mostly wait (fault windows, SQS delays and countdowns, leases) with the CPU nearly idle and
# bounds of minutes, so they overlap the rest instead of following it. The lanes are separate pytest sessions:
# lane 2 has its own temporary folder and writes no cache, so they share nothing; its report follows lane 1's,
# and either lane failing fails the tier.
run_in_lanes() {
  local tier=$1
  shift
  local lane2_tests=("$@") lane2_log lane2_tmp lane2 lane1_rc=0 lane2_rc=0
  echo "=== pytest tests/$tier (lane 1: all but ${lane2_tests[*]}; lane 2, alongside: those)"
  lane2_log=$(mktemp)
  lane2_tmp=$(mktemp -d)
  .venv/bin/pytest -p no:cacheprovider --basetemp "$lane2_tmp/t" "${lane2_tests[@]}" >"$lane2_log" 2>&1 &
  lane2=$!
  trap 'kill "$lane2" 2>/dev/null || true' EXIT
  .venv/bin/pytest "tests/$tier" "${lane2_tests[@]/#/--ignore=}" || lane1_rc=$?
  wait "$lane2" || lane2_rc=$?
  trap - EXIT
  echo "=== pytest tests/$tier, lane 2: ${lane2_tests[*]}"
  cat "$lane2_log"
  rm -rf "$lane2_log" "$lane2_tmp"
  echo "=== tests/$tier: lane 1 exit $lane1_rc, lane 2 exit $lane2_rc"
  [ "$lane1_rc" = 0 ] && [ "$lane2_rc" = 0 ]
}

echo "=== pytest tests/unit"
.venv/bin/pytest tests/unit
# Integration, lane 2 (~4 min, nearly all waiting): a 90 s countdown outliving the visibility timeout, and the
# ingress's 15/30/60 s hand-back delays and publish lease.
run_in_lanes integration tests/integration/test_visibility_keeper.py tests/integration/test_ingress_backoff.py
# System, lane 2 (~16 min): the chaos tests (a 3-minute AWS outage, 2 minutes of 503s, a 30 s SQS outage, kills)
# and the outage tests (store outages, a poison task waiting out visibility timeouts and the reaper).
run_in_lanes system tests/system/test_chaos.py tests/system/test_chaos_outage.py tests/system/test_faults_outages.py
