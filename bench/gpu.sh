#!/usr/bin/env bash
# The GPU run: the figures that only a GPU settles, in one script, under 8 minutes on one
# H100-class card before the tsfsar step was added (that step has not run on a GPU yet). Installs
# nothing; uses the project's venv (make install) if there is one.
#
#   bash bench/gpu.sh                         # device cuda, results in bench/results/gpu/
#   bash bench/gpu.sh --device cpu --quick    # the same steps on CPU at tiny sizes (CI)
#
# Steps (each a benchmark module; bench/<name>.py says what it times):
#   extraction  fsar-extract end to end vs the bare encoder: ViT-B/16, fp16 on CUDA, synthetic
#               videos, every CPU core decoding (targets >= 0.9x and >= 10,000 frames/s)
#   training    emp from the store vs fed by frozen CLIP online (episodes/s, speedup against its
#               FLOP ceiling) and emp's loader stall share on a streamed split (target < 5%)
#   evaluation  emp 1-shot and 5-shot, 10,000 episodes against one pass over the split
#   tsfsar      TS-FSAR from the store at all 13 taps vs fed by frozen CLIP online (FLOPs, bytes and
#               s/episode), the streamed loader's warm and cold MB/s against the break-even read
#               rate, and its stall share
# Then `python -m bench.run_all --report` puts them in docs/performance.md (section GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
quick=()
out=bench/results/gpu
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --quick) quick=(--quick); shift ;;
        --out) out="$2"; shift 2 ;;
        *) echo "usage: bash bench/gpu.sh [--device cuda|cpu] [--quick] [--out DIR]" >&2; exit 2 ;;
    esac
done
py=.venv/bin/python
[ -x "$py" ] || py=python3
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
"$py" -c "import sys, torch; d = sys.argv[1]; assert not d.startswith('cuda') or torch.cuda.is_available(), 'no CUDA device'; print('device', d, torch.cuda.get_device_name(0) if d.startswith('cuda') else '')" "$device"

start=$SECONDS
step() {
    local name=$1 t=$SECONDS
    shift
    echo "== bench.$name $*" >&2
    "$py" -m "bench.$name" --device "$device" --out "$out" "${quick[@]}" "$@"
    echo "== bench.$name: $((SECONDS - t)) s (total $((SECONDS - start)) s)" >&2
}
if [ ${#quick[@]} -eq 0 ]; then
    step extraction --videos-per-class 40
else
    step extraction
fi
step training --heads emp --no-small --stall
step evaluation --heads emp
if [ ${#quick[@]} -eq 0 ]; then
    step tsfsar --taps all
else
    step tsfsar
fi
"$py" -m bench.run_all --report --print-only --out "$out" --only extraction,training,evaluation,tsfsar
echo "done in $((SECONDS - start)) s; docs/performance.md: python -m bench.run_all --report" >&2
