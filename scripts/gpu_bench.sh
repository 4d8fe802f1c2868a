#!/usr/bin/env bash
# Run benchmarks/amg.py (issue 5) on a CUDA box that has torch+CUDA but maybe not sam2/hydra and no
# network. Target: under 8 minutes on one H100.
#
#   scripts/gpu_bench.sh                      # large model, 32x32 points, warm timing, CUDA
#   scripts/gpu_bench.sh --device cpu --dry-run   # check the plan / wheel install without a GPU
#
# Options: --device DEV (cuda), --models "m1 m2" (all four sizes get a checkpoint; benchmark runs
# on --bench-models, default sam2.1_hiera_large), --wheels DIR (scripts/wheels), --python PY,
# --cache DIR (random checkpoints), --dry-run (install + plan only), extra args after `--` go to
# benchmarks/amg.py.
#
# Offline install: sam2 1.1.0 and its small pure-Python deps come from wheels shipped beside this
# script (never committed; .gitignore them). Produce them on a connected machine with the SAME
# Python minor version and torch as the GPU box:
#   pip download --dest scripts/wheels hydra-core omegaconf iopath antlr4-python3-runtime \
#       portalocker PyYAML tqdm pillow
#   pip wheel --wheel-dir scripts/wheels --no-deps iopath antlr4-python3-runtime  # sdists -> wheels
#   SAM2_BUILD_CUDA=0 pip wheel --wheel-dir scripts/wheels --no-deps --no-build-isolation sam2==1.1.0
# (sam2 is an sdist that must build against the installed torch, hence --no-build-isolation;
# SAM2_BUILD_CUDA=0 skips its optional CUDA extension, which only does hole filling when
# min_mask_region_area > 0.)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
DEVICE=cuda
WHEELS="$HERE/wheels"
PY="${PYTHON:-python3}"
CACHE="${TMPDIR:-/tmp}/samseg-bench"
MODELS="sam2.1_hiera_tiny sam2.1_hiera_small sam2.1_hiera_base_plus sam2.1_hiera_large"
BENCH_MODELS="sam2.1_hiera_large"
DRY_RUN=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --cache) CACHE="$2"; shift 2 ;;
    --models) MODELS="$2"; shift 2 ;;
    --bench-models) BENCH_MODELS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

log() { printf '[gpu_bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# 1. torch (+ CUDA unless --device cpu) must already be there: it is too big to ship as a wheel here.
"$PY" - "$DEVICE" <<'EOF'
import sys
import torch
dev = sys.argv[1]
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
if dev.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("CUDA requested but torch.cuda.is_available() is False")
    print("device:", torch.cuda.get_device_name(0))
EOF

# 2. sam2 / hydra / omegaconf / iopath from local wheels when missing (no network: --no-index).
if ! "$PY" -c "import sam2, hydra, omegaconf, iopath" 2>/dev/null; then
  if [[ ! -d "$WHEELS" ]] || ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "sam2/hydra-core/omegaconf/iopath missing and no wheels in $WHEELS (see the header for pip download/wheel)" >&2
    exit 1
  fi
  log "installing sam2 + deps from $WHEELS (offline)"
  "$PY" -m pip install --no-index --find-links "$WHEELS" --no-build-isolation \
    sam2==1.1.0 hydra-core omegaconf iopath
fi
"$PY" -c "import sam2, hydra; print('sam2 + hydra importable')"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$CACHE"
BENCH_ARGS=(--device "$DEVICE" --sizes 1024x768 --points-per-side 32 --off-points-per-side 16
            --modes upstream,samseg,half,compile,prune --repeats 3 --cache "$CACHE")
if [[ $DRY_RUN -eq 1 ]]; then
  log "dry run: would write random checkpoints for: $MODELS into $CACHE"
  for m in $BENCH_MODELS; do
    log "dry run: $PY benchmarks/amg.py --model $m ${BENCH_ARGS[*]} ${EXTRA[*]:-}"
    "$PY" "$ROOT/benchmarks/amg.py" --model "$m" "${BENCH_ARGS[@]}" "${EXTRA[@]}" --dry-run
  done
  exit 0
fi

# 3. A random-weight checkpoint per model size (real code path: build_sam2 + strict load).
for m in $MODELS; do
  ckpt="$CACHE/$m-seed0.pt"
  if [[ ! -f "$ckpt" ]]; then
    log "writing random checkpoint $ckpt"
    "$PY" -c "import sys; from pathlib import Path; from samseg.runtime.build import write_random_checkpoint as w; w(sys.argv[1], Path(sys.argv[2]), 0)" "$m" "$ckpt"
  fi
  "$PY" -c "import sys; from pathlib import Path; from samseg.runtime.build import build_model as b; b(sys.argv[1], Path(sys.argv[2]), sys.argv[3]); print('loads on', sys.argv[3], ':', sys.argv[1])" "$m" "$ckpt" "$DEVICE"
done

# 4. The benchmark: warm timing (warm-up calls, compile paid in its constructor), median of 3.
for m in $BENCH_MODELS; do
  log "benchmark $m on $DEVICE"
  timeout 420 "$PY" "$ROOT/benchmarks/amg.py" --model "$m" "${BENCH_ARGS[@]}" "${EXTRA[@]}"
done
log "done"
