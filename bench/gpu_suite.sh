#!/usr/bin/env bash
# The GPU session's script: install what is missing from carried wheels, check correctness on the GPU,
# run the kernel, train-step and sampler benchmarks, and pack every log and record into one archive.
#
# A device call may run 10 minutes, so the work comes in parts, each well inside that:
#   bash bench/gpu_suite.sh check      # CUDA tests (kernels vs references, attention, sampler vs HF) + loss bench
#   bash bench/gpu_suite.sh train      # bench/throughput.py: 32B width at 16K and 32K tokens, 7B width
#   bash bench/gpu_suite.sh sample     # bench/sampler.py on the 0.5B workload, and the RMSNorm/RoPE/SwiGLU ops
# Prepare here first (liger-kernel is pure Python; the GPU image already has torch, triton, transformers):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl liger-kernel==0.8.5
# and carry [".whl"] in each call. With $OUT set (the device tool), everything comes back as
# $OUT/gpu_suite_<part>.tgz (the tool returns at most 8 files); without it, logs stay in bench/results/gpu_suite/.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: bench/gpu_suite.sh check|train|sample}
LOG=bench/results/gpu_suite/$PART
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0   # tests/conftest.py turns the interpreter on by default
PY=${PYTHON:-python3}
status=0

step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, log to $LOG/NAME.log, go on after a failure
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || status=1
  tail -n 30 "$LOG/$name.log"
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
  echo "commit $(git rev-parse --short HEAD 2>/dev/null) | $(date -u +%FT%TZ)"; } | tee "$LOG/env.txt"

case "$PART" in
  check)
    step tests 330 $PY -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_fused_linear_ce.py \
      tests/test_paged_attention.py tests/test_checkpoint.py tests/test_optim.py tests/test_sampler.py
    step kernels_loss 210 $PY bench/kernels.py --only loss ;;
  train)
    step throughput_32b_16k 180 $PY bench/throughput.py --preset qwen2.5-32b --layers 4 --tokens 16384
    step throughput_32b_32k 180 $PY bench/throughput.py --preset qwen2.5-32b --layers 4 --tokens 32768
    step throughput_7b_16k 180 $PY bench/throughput.py --preset qwen2.5-7b --layers 8 --tokens 16384 ;;
  sample)
    step sampler_0.5b 390 $PY bench/sampler.py --preset qwen2.5-0.5b
    step kernels_ops 150 $PY bench/kernels.py --only ops ;;
  *) echo "unknown part $PART: check|train|sample"; exit 2 ;;
esac

cp bench/results/*.json "$LOG"/ 2>/dev/null
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_suite_$PART.tgz" -C bench/results/gpu_suite "$PART"
fi
echo "gpu_suite $PART: status $status (logs in $LOG)"
exit $status
