#!/usr/bin/env bash
# One command on a fresh machine: install (if needed) and run the local stack (`samseg up`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/samseg up "$@"
