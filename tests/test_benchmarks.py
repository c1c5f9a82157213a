"""The GPU-path benchmark script runs end to end (on CPU, at a tiny size) and prints its
figures, so it is ready when an accelerator is available."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import launching, side_envs

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu():
    cmd = [sys.executable, "bench/gpu.py", "--preset", "bench-small", "--seq-len", "128",
           "--batch", "2", "--steps", "1", "--decode-batch", "4", "--prompt-len", "16",
           "--new-tokens", "16", "--peak-tflops", "1", "--hbm-gbps", "10",
           "--attention", "xla,tokamax_xla"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=launching.env(devices=None))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MFU" in out.stdout and "bound" in out.stdout
    assert "tokamax_xla |" in out.stdout  # one row per attention backend
    row = out.stdout.strip().splitlines()[-1].split("|")
    mfu, decode_tps = float(row[5].strip().rstrip("%")), float(row[7])
    assert mfu > 0 and decode_tps > 0, out.stdout


@pytest.mark.slow
def test_mesh_tool_without_matplotlib_and_without_involuntary_remat(tmp_path):
    """Every mesh the tool reports compiles without XLA replicating an activation to reshard
    it ("Involuntary full rematerialization"); tables always, the plot when matplotlib is
    there."""
    cmd = [sys.executable, "-m", "dapo_jax.experiments.mesh", "--preset", "bench-small",
           "--mesh", "1x8x1,2x4x1,1x4x2,8x1x1", "--seq-len", "256", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=launching.env(devices=None))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Involuntary full rematerialization" not in out.stderr
    stem = tmp_path / "bench-small_T256_mb1"
    assert stem.with_suffix(".md").read_text().count("| yes |") == 4
    assert stem.with_suffix(".csv").exists()
    try:
        import matplotlib  # noqa: F401
        assert stem.with_suffix(".png").exists()
    except ImportError:
        assert "no plot: matplotlib is not installed" in out.stdout


def test_memory_plan_of_a_seed_config(tmp_path):
    """The planner compiles the seed config's own update and log-prob functions (Qwen3-1.7B
    shape, 10240 tokens, float32 masters) for 8x H100 and reports trainer and vLLM shares
    that fit. It needs the aot environment: on CPU stand-in devices the CPU compiler
    overstates the peak (test_compile checks that fallback's label)."""
    cmd = [side_envs.python("aot"), "-m", "dapo_jax.experiments.memory", "--config",
           "configs/dapo_qwen3_1p7b.py", "--preset", "qwen3-1.7b", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "dapo_qwen3_1p7b.md").read_text()
    assert "Compiled for h100x8: 8 x NVIDIA H100 80GB HBM3." in text
    # float32 masters: 1.72e9 params x 4 bytes / 8 devices = 0.8 GiB, moments twice that, and
    # the mini-batch's rows.
    assert "| trainer: update arguments (float32 masters, AdamW moments, mini-batch; " \
           "shards) | 2.4 |" in text
    assert "| vLLM: bf16 weights | 3.2 |" in text
    assert "Fits: trainer peak within its budget: yes; at least one full-length sequence " \
           "of KV cache (vLLM's start condition): yes; the GPU: yes." in text
