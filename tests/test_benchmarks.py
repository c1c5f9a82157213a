"""The GPU-path benchmark script runs end to end (on CPU, at a tiny size) and prints its
figures, so it is ready when an accelerator is available."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu():
    cmd = [sys.executable, "bench/gpu.py", "--preset", "bench-small", "--seq-len", "128",
           "--batch", "2", "--steps", "1", "--decode-batch", "4", "--prompt-len", "16",
           "--new-tokens", "16", "--peak-tflops", "1", "--hbm-gbps", "10"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MFU" in out.stdout and "bound" in out.stdout
    row = out.stdout.strip().splitlines()[-1].split("|")
    mfu, decode_tps = float(row[5].strip().rstrip("%")), float(row[7])
    assert mfu > 0 and decode_tps > 0, out.stdout
