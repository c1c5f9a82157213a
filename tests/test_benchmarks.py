"""The GPU-path benchmark script runs end to end (on CPU, at a tiny size) and prints its
figures, so it is ready when an accelerator is available."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dapo_jax.experiments.timing import train_flops_per_token
from dapo_jax.models import preset
from tests import launching, side_envs

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_runs_on_cpu(tmp_path):
    """bench/gpu.py's quick parts at toy sizes (tokamax's XLA op standing in for the kernel):
    each part's JSON with numbers, and the summary. The training parts (arith, step, launch)
    run the same trainer and launcher the end-to-end tests run."""
    cmd = [sys.executable, "bench/gpu.py", "--smoke", "--parts", "attention,update,decode",
           "--peak-tflops", "1", "--hbm-gbps", "10", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=launching.env(devices=None))
    assert out.returncode == 0, out.stderr[-3000:]
    read = lambda name: json.loads((tmp_path / f"{name}.json").read_text())
    attention = read("attention")
    for name in ("xla_bf16", "kernel_bf16"):  # bf16 against float32: close, not equal
        r = attention[name]
        assert r["finite"] and 0 < r["logprob_max_abs_err"] < 0.05, r
        assert 0 < r["grad_rel_err_median"] < 0.05, r
    for impl in ("xla", "tokamax_xla"):
        for rows, seq in ((2, 128), (1, 256)):
            r = read(f"update_{impl}_{rows}x{seq}")
            assert r["finite_loss"] and r["compiled_peak_gib"] > 0, r
            # MFU is the model FLOPs of the tokens timed over the peak given (1 TFLOP/s).
            assert r["tokens_s"] == pytest.approx(rows * seq / r["step_s"])
            flops = train_flops_per_token(preset("qwen3-tiny", max_position_embeddings=seq), seq)
            assert r["mfu"] == pytest.approx(r["tokens_s"] * flops / 1e12), r
    cfg = preset("qwen3-tiny")
    runs = read("decode")["runs"]
    assert [r["batch"] for r in runs] == [4, 8]
    for r in runs:  # no early stop: every row makes its 16 tokens
        assert r["tokens"] == r["batch"] * 16, r
        # batch x 10 GB/s over the bf16 weights + the mean KV of a step (16 + 16 / 2 slots).
        kv = 2 * cfg.num_layers * r["batch"] * cfg.num_kv_heads * cfg.head_dim * 24 * 2
        assert r["bound_tokens_s"] == pytest.approx(r["batch"] * 10e9 /
                                                    (cfg.num_params * 2 + kv)), r
        assert r["of_bound"] == pytest.approx(r["tokens_s"] / r["bound_tokens_s"]), r
    assert "| update_tokamax_xla_1x256 | xla, remat full:" in (tmp_path / "summary.md").read_text()


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
    that fit. With remat=full, what the config's `auto` chooses at its share (bench/memory/;
    the choice itself costs three more full-size compiles and is tested on a tiny model in
    test_compile). It needs the aot environment: on CPU stand-in devices the CPU compiler
    overstates the peak (test_compile checks that fallback's label)."""
    cmd = [side_envs.python("aot"), "-m", "dapo_jax.experiments.memory", "--config",
           "configs/dapo_qwen3_1p7b.py", "--preset", "qwen3-1.7b", "--out", str(tmp_path),
           "--config.model.remat=full"]
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
