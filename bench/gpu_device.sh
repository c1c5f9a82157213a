#!/usr/bin/env bash
# bench/gpu.py on a lent GPU, in one device call (../shared/reference/GPU_FACTS.md, "Running
# on the lent GPU"). The device image has Python 3.12, jax 0.11.2 with the CUDA 13 plugin,
# flax, optax, orbax, chex, transformers; what it lacks travels as wheels in .whl/ (ignored).
#
#   here, once:   bash bench/gpu_device.sh fetch
#   the device:   run(command="bash bench/gpu_device.sh run", carry=[".whl"], timeout_s=580)
#
# `run` installs the wheels into /tmp/site, runs every part of bench/gpu.py (each under its
# own timeout, the whole under 540 s) and leaves in $OUT: summary.md, log.txt and gpu.tar.gz
# (every part's JSON), also when a part fails or the time runs out.
set -euo pipefail
cd "$(dirname "$0")/.."

# tokamax 0.0.17 and what it imports (xprof's CLI tools import fire; pydantic for its
# configs), ml-collections (configs), math-verify (rewards), checked by importing the
# trainer, the launcher, the sidecar and tokamax's attention ops in a Python 3.12
# environment holding only the image's packages and these.
WHEELS=(tokamax==0.0.17 xprof==2.24.2 fire==0.7.1 termcolor==3.3.0 qwix==0.1.8 einshape==1.0
        immutabledict==4.3.1 tensorboardx==2.6.5 pydantic==2.14.4 pydantic-core==2.50.5
        annotated-types==0.8.0 typing-inspection==0.4.5 ml-collections==1.1.0
        math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2)

case "${1:-}" in
  fetch)
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    du -sh .whl ;;
  run)
    : "${OUT:?run this on the device machine (it sets OUT)}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    mkdir -p /tmp/gpu_out
    timeout 540 python3 bench/gpu.py --out /tmp/gpu_out 2>&1 | tee "$OUT/log.txt" || true
    cp /tmp/gpu_out/summary.md "$OUT/" 2>/dev/null || true
    tar -czf "$OUT/gpu.tar.gz" -C /tmp gpu_out ;;
  *)
    echo "usage: bash bench/gpu_device.sh fetch|run" >&2
    exit 2 ;;
esac
