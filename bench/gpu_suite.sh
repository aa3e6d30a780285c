#!/usr/bin/env bash
# The GPU session's script: one device call of at most ~8 minutes (the device lends 15 minutes in all,
# start-up included, and 10 minutes a command), highest-value steps first, each step's log written to
# $OUT as it runs, so a call cut off at its limit still brings back everything it finished.
#
#   bash bench/gpu_suite.sh            # all steps below, in order, within BUDGET_S (default 480 s)
#   bash bench/gpu_suite.sh STEP...    # only these steps (names as listed in STEPS)
#
# Prepare here first (liger-kernel is pure Python; the GPU image already has torch, triton, transformers):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==0.8.5
# and carry [".whl"] in the call:  run(command="bash bench/gpu_suite.sh", carry=[".whl"], timeout_s=540)
# Without $OUT (a GPU machine of your own), logs and records go to bench/results/gpu_suite/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0   # tests/conftest.py turns the interpreter on by default
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
LOG=${OUT:-bench/results/gpu_suite}
mkdir -p "$LOG"
status=0
START=$SECONDS

# name : time limit (s) : command. Order is value order: correctness first, then the figures the issues
# ask for (train step at 32B width, loss kernel at the 32B shape, sampler), then the extras.
STEPS=(
  "cuda_tests:150:$PY -m pytest -q -p no:cacheprovider -rs -k cuda tests/"
  "throughput_32b_16k:120:$PY bench/throughput.py --preset qwen2.5-32b --layers 4 --tokens 16384 --steps 6 --warmup 2"
  "kernels_loss:75:$PY bench/kernels.py --only loss --rep-ms 500"
  "sampler_0.5b:110:$PY bench/sampler.py --preset qwen2.5-0.5b --num-seqs 128 --skip-hf --decode-batches 64 256"
  "throughput_32b_32k:90:$PY bench/throughput.py --preset qwen2.5-32b --layers 2 --tokens 32768 --steps 4 --warmup 1"
  "kernels_ops:60:$PY bench/kernels.py --only ops --rep-ms 300"
)

step() {  # step NAME LIMIT CMD: bounded by its limit and by what is left of the budget; log streamed to $LOG
  local name=$1 limit=$2 cmd=$3
  local left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then echo "=== $name: skipped, ${left}s of the budget left"; status=1; return; fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== $name (limit ${limit}s): $cmd"
  local t0=$SECONDS
  # stdbuf + tee: the log on $OUT grows line by line, so a cut-off call still returns the lines so far.
  timeout --kill-after=5 "$limit" stdbuf -oL -eL bash -c "$cmd" 2>&1 | tee "$LOG/$name.log" | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$LOG/$name.log"
  [ "$rc" -eq 0 ] || status=1
  cp bench/results/*.json "$LOG"/ 2>/dev/null   # records so far, after every step
}

# Environment: carried wheels, then skyt1 itself (no index and no build isolation: nothing can be fetched).
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
if ! $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$LOG/install.log" 2>&1; then
  # No wheel/setuptools to build with: lay the package out as the wheel would (kernels/ as skyt1.kernels).
  echo "pip install -e . failed (install.log); using a copy of the package on PYTHONPATH"
  rm -rf /tmp/skyt1_pkg && mkdir -p /tmp/skyt1_pkg && cp -r skyt1 /tmp/skyt1_pkg/ && cp -r kernels /tmp/skyt1_pkg/skyt1/
  export PYTHONPATH=/tmp/skyt1_pkg${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import skyt1.kernels.fused_linear_ce" || { echo "skyt1 does not import"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null) | $(date -u +%FT%TZ)"; } 2>&1 | tee "$LOG/env.txt"

want=("$@")
known=0
for entry in "${STEPS[@]}"; do
  name=${entry%%:*}; rest=${entry#*:}; limit=${rest%%:*}; cmd=${rest#*:}
  if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " == *" $name "* ]]; then continue; fi
  known=$((known + 1))
  step "$name" "$limit" "$cmd"
done
if [ ${#want[@]} -gt 0 ] && [ "$known" -ne ${#want[@]} ]; then
  echo "unknown step among: ${want[*]}; steps: $(printf '%s ' "${STEPS[@]%%:*}")"; exit 2
fi
echo "gpu_suite: status $status in $((SECONDS - START)) s (logs in $LOG)"
exit $status
