"""The trainer as a multi-controller JAX job: N processes give the same run as one.

Fast tests check the pieces (work shares, config checks, per-sequence sampling keys); the
slow ones run configs/arith_tiny.py as 2 processes x 4 CPU devices against 1 process x 8,
resume the 2-process run, and kill one process of a running job.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import arith_tiny
from dapo_jax import multihost, placement
from dapo_jax.launch import trainer_flags
from dapo_jax.models import load_pretrained
from dapo_jax.sharding import batch_sharding, make_mesh
from dapo_jax.train import config as config_lib
from dapo_jax.train.settings import Settings, validate
from rollout.generation import Generator, SamplingParams
from tests import sidecar
from tests.launching import env, read_metrics, wait_for

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("n,count", [(10, 3), (2, 4), (0, 2), (16, 2)])
def test_shares_are_contiguous_and_cover_every_item_once(n, count):
    parts = [multihost.share(n, p, count) for p in range(count)]
    assert [i for s in parts for i in range(n)[s]] == list(range(n))
    sizes = [s.stop - s.start for s in parts]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_exchanges_are_the_identity():
    assert multihost.split_work(lambda part: [i * i for i in range(10)[part]], 10) == \
        [i * i for i in range(10)]
    assert multihost.from_primary(lambda: {"a": [1, 2]}) == {"a": [1, 2]}
    assert multihost.allgather_objects(("x", 3)) == [("x", 3)]
    x = jax.device_put(np.arange(16.0).reshape(8, 2),
                       batch_sharding(make_mesh((1, -1, 1))))
    np.testing.assert_array_equal(multihost.to_host(x), np.arange(16.0).reshape(8, 2))


@pytest.mark.parametrize("overrides,key", [
    ({"mesh.coordinator_address": "localhost"}, "mesh.coordinator_address"),
    ({"mesh.coordinator_address": "10.0.0.1:99999"}, "mesh.coordinator_address"),
    ({"mesh.coordinator_address": "10.0.0.1:1234", "mesh.num_processes": 2,
      "mesh.process_id": 2}, "mesh.process_id"),
    ({"mesh.coordinator_address": "10.0.0.1:1234", "mesh.num_processes": 0},
     "mesh.num_processes"),
    ({"mesh.num_processes": 2}, "mesh.coordinator_address"),
    ({"mesh.heartbeat_timeout_s": 0}, "mesh.heartbeat_timeout_s"),
])
def test_bad_multi_process_settings_name_the_key(overrides, key):
    cfg = config_lib.apply_overrides(arith_tiny.get_config(), overrides)
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        validate(cfg, None)


def test_launcher_splits_gpus_over_processes_and_keeps_its_own_flag():
    cfg = arith_tiny.get_config()
    cfg.trainer.placement.policy_num_gpus_per_node = 8
    s = Settings.from_config(cfg)
    envs = [placement.trainer_env(s, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, i, 2)
            for i in range(2)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1,2,3", "4,5,6,7"]
    with pytest.raises(ValueError, match="do not split over 3"):
        placement.trainer_env(s, {}, 0, 3)
    assert trainer_flags(["--config", "c.py", "--num_processes=2", "--config.a=1",
                          "--num_processes", "3"]) == ["--config", "c.py", "--config.a=1"]


def test_a_sequence_samples_the_same_in_any_batch_and_split(tiny_checkpoints):
    """Sampling is keyed per sequence (seed, prompt key = dataset position, sample index): a
    prompt's responses do not depend on the other prompts of the call, their order or the
    device split; two copies of one prompt (different keys) draw different samples."""
    model = load_pretrained(tiny_checkpoints["qwen3_tied"], dtype="float32")
    from flax import nnx

    graphdef, params = nnx.split(model)
    sp = SamplingParams(temperature=1.0, max_tokens=12, seed=7)
    a, b, c = [5, 9, 13], [21, 8], [3, 3, 3, 3]
    gen = Generator(graphdef, params, stop_token_ids=[2], max_model_len=64)
    alone = gen.generate([b], sp, n=3, keys=[11])[0]
    mixed = gen.generate([a, b, c], sp, n=3, keys=[10, 11, 12])
    assert [s.token_ids for s in mixed[1]] == [s.token_ids for s in alone]
    assert len({tuple(s.token_ids) for s in alone}) > 1  # the samples of a prompt differ
    twice = gen.generate([b, b], sp, n=3, keys=[11, 40])  # a repeated prompt in one batch
    assert [s.token_ids for s in twice[0]] == [s.token_ids for s in alone]
    assert [s.token_ids for s in twice[1]] != [s.token_ids for s in twice[0]]
    mesh = make_mesh((1, -1, 1))
    sharded = load_pretrained(tiny_checkpoints["qwen3_tied"], dtype="float32", mesh=mesh)
    gen8 = Generator(*nnx.split(sharded), stop_token_ids=[2], max_model_len=64, mesh=mesh,
                     max_num_seqs=3)  # one prompt's samples per call
    reordered = gen8.generate([c, b], sp, n=3, keys=[12, 11])
    assert [s.token_ids for s in reordered[1]] == [s.token_ids for s in alone]
    assert [s.token_ids for s in reordered[0]] == [s.token_ids for s in mixed[2]]


# ----------------------------------------------------------------------------- runs
SHORT = {"trainer.ckpt_interval": 1, "trainer.eval_interval": 2,
         "trainer.eval_before_train": False, "data.builtin_val_size": 16,
         "data.builtin_train_size": 256, "trainer.hf_save_interval": 2}
# Float-noise metrics (differences of two log-probs of the same tokens, ~1e-7) are compared
# with this absolute floor; everything else to 1e-4 relative.
ATOL = 1e-6
# Weights after 2 updates, to float noise (different meshes reduce in different orders;
# measured: 1 of 49,152 entries 2.9e-6 apart).
WEIGHT_ATOL = 1e-5


def _flags(overrides: dict[str, object]) -> list[str]:
    return [f"--config.{k}={v}" for k, v in overrides.items()]


def _compare(reference: list[dict], other: list[dict], skip: tuple[str, ...] = ()) -> None:
    assert [r["step"] for r in reference] == [r["step"] for r in other]
    for ref, got in zip(reference, other, strict=True):
        for key, value in ref.items():
            if key.startswith(("timing/", "throughput/", *skip)):
                continue
            assert math.isclose(got[key], value, rel_tol=1e-4, abs_tol=ATOL), \
                (ref["step"], key, value, got[key])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """arith_tiny for 2 steps in 1 process x 8 devices, synchronous and colocated: the run
    the multi-process ones must reproduce. (A process of its own: this one compiles without
    LLVM's optimisations, conftest, which would make the steps twice as slow.)"""
    run_dir = tmp_path_factory.mktemp("one")
    out = subprocess.run(
        [sys.executable, "-m", "dapo_jax.train", "--config", "configs/arith_tiny.py",
         *_flags({**SHORT, "trainer.max_steps": 2, "trainer.run_dir": run_dir})],
        cwd=REPO, env=env(devices=8), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path, one_process):
    """arith_tiny for 2 steps: 1 process x 8 devices against 2 processes x 4 devices
    started by the launcher (the colocated engine generating on the mesh over both). (The
    2-process resume: test_two_processes_generating_on_meshes_of_their_own_train_as_one.)"""
    reference = read_metrics(one_process)
    two = tmp_path / "two"
    out = subprocess.run(
        [sys.executable, "-m", "dapo_jax.launch", "--config", "configs/arith_tiny.py",
         "--num_processes=2", *_flags({**SHORT, "trainer.run_dir": two,
                                       "trainer.max_steps": 2})],
        cwd=REPO, env=env(devices=4), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = read_metrics(two)
    assert [r["step"] for r in metrics] == [1, 2]
    _compare(reference, metrics)
    # The HF save of both runs' last step holds the same weights.
    ours, theirs = (load_file(str(d / "hf" / "step_2" / "model.safetensors"))
                    for d in (two, one_process))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=WEIGHT_ATOL)
    # Written once: one config, one metrics line per step, one eval summary per eval.
    assert (two / "eval" / "step_2_summary.json").exists()
    assert not (two / "logs" / "process_1.out").read_text().count("step 1:")


def _groups(run_dir: Path) -> dict[int, dict]:
    """step -> its trained prompts, their weight versions and generation batches."""
    rows = [json.loads(line) for line in open(run_dir / "trained_groups.jsonl")]
    return {r["step"]: r for r in rows}


def _start(run_dir: Path, overrides: dict[str, object], log_dir: Path) -> list[subprocess.Popen]:
    """Two trainer processes of 4 CPU devices started by hand (the SLURM / TPU-pod way: one
    `python -m dapo_jax.train` per host), process i logging to log_dir/process_i.log."""
    port = sidecar.free_port()
    procs = []
    for i in range(2):
        with open(log_dir / f"process_{i}.log", "ab") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dapo_jax.train", "--config", "configs/arith_tiny.py",
                 *_flags({**overrides, "trainer.run_dir": run_dir,
                          "mesh.coordinator_address": f"127.0.0.1:{port}",
                          "mesh.num_processes": 2, "mesh.process_id": i})],
                cwd=REPO, env=env(devices=4), stdout=log, stderr=subprocess.STDOUT))
    return procs


@pytest.mark.slow
def test_two_processes_generating_on_meshes_of_their_own_train_as_one(tmp_path, one_process):
    """Asynchronous DAPO over 2 processes x 4 devices, each with 2 trainer devices (one
    trainer mesh of 4 over both) and a generation mesh of its own 2: each process generates
    and scores its share of every batch and the trainer gathers them; the weights reach
    each generation mesh from the trainer's by one all-gather and a device-to-device copy.
    With max_staleness_steps=0 each worker generates only what the trainer asks for, with
    the weights of its last update: the 2 steps (held-out eval and HF save at step 2
    included) train the synchronous single-process run's prompts with its weight versions
    and give its metrics and weights. (One process on a split mesh runs the same worker
    code with one share: test_async.) Resumed to step 4 at staleness 1, the worker threads
    run ahead, every trained group stays within the bound and every generation batch is
    taken once."""
    run_dir = tmp_path / "run"
    split = {**SHORT, "trainer.placement.colocate_all": False,
             "trainer.placement.policy_num_gpus_per_node": 2,
             "trainer.fully_async.enabled": True}
    for steps, bound in ((2, 0), (4, 1)):
        procs = _start(run_dir, {**split, "trainer.max_steps": steps,
                                 "trainer.fully_async.max_staleness_steps": bound}, tmp_path)
        for i, proc in enumerate(procs):
            code = proc.wait(timeout=600)
            assert code == 0, (tmp_path / f"process_{i}.log").read_text()[-3000:]
        if bound == 0:
            # The same prompts trained with the same weight versions, and so the same
            # metrics (the padding of the update's rows depends on the trainer's device
            # count, 8 vs 4) and weights.
            assert _groups(run_dir) == _groups(one_process)
            assert all(r["async/staleness_max"] == 0 for r in read_metrics(run_dir))
            _compare(read_metrics(one_process), read_metrics(run_dir),
                     skip=("batch/token_efficiency",))
            ours, theirs = (load_file(str(d / "hf" / "step_2" / "model.safetensors"))
                            for d in (run_dir, one_process))
            for name in ours:
                np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=WEIGHT_ATOL)
    assert "(step 2)" in (tmp_path / "process_0.log").read_text()  # resumed
    # max_ckpts_to_keep=2 of the checkpoints both processes wrote after each step
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) \
        == ["3", "4"]
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    assert sorted(rows) == [1, 2, 3, 4]
    assert all(rows[s]["async/staleness_max"] <= 1 for s in (3, 4))
    assert max(rows[s]["async/staleness_max"] for s in (3, 4)) == 1  # it ran ahead
    groups = _groups(run_dir)
    # Every generation batch is taken once or still pending (256 prompts: the order's
    # second epoch starts within these batches, so prompts themselves repeat).
    taken = [b for s in sorted(groups) for b in groups[s]["batches"]]
    pending = groups[4]["regenerate"]
    assert sorted(taken + pending) == list(range(len(taken) + len(pending)))
    assert all(len(groups[s]["prompt_index"]) == 32 for s in groups)


@pytest.mark.slow
def test_a_dead_process_ends_the_job_with_a_clear_error(tmp_path):
    """Two trainer processes started by hand (the SLURM/TPU way) with a JAX sidecar,
    asynchronous at staleness 1: the sidecar path (process 0's worker thread the only
    client, the trainer threads sharing its batches, exports written by both) runs a step;
    then process 1 is killed and process 0 must exit on its own, saying why, within bounded
    time."""
    heartbeat = 10
    run_dir = tmp_path / "run"
    model = str(Path(arith_tiny.__file__).resolve().parent.parent / "dapo_jax" / "assets" /
                "arith_base")
    with sidecar.running("jax", model, run_dir / "exports",
                         stop_ids=",".join(map(str, _stop_ids(model)))) as (url, _):
        port = sidecar.free_port()
        overrides = {**SHORT, "trainer.run_dir": run_dir, "trainer.max_steps": 50,
                     "trainer.eval_interval": 0, "generator.backend": "sidecar",
                     "generator.sidecar_urls": f"('{url}',)",
                     "mesh.coordinator_address": f"127.0.0.1:{port}",
                     "mesh.num_processes": 2, "mesh.heartbeat_timeout_s": heartbeat,
                     "trainer.placement.colocate_all": False,
                     "trainer.fully_async.enabled": True,
                     "trainer.fully_async.max_staleness_steps": 1}
        procs = []
        for i in range(2):
            log = open(tmp_path / f"process_{i}.log", "wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "dapo_jax.train", "--config", "configs/arith_tiny.py",
                 *_flags({**overrides, "mesh.process_id": i})], cwd=REPO, env=env(devices=4),
                stdout=log, stderr=subprocess.STDOUT))
        try:
            wait_for(lambda: len(read_metrics(run_dir)) >= 1, 300, procs[0], "step 1")
            assert json.loads((run_dir / "exports" / "step_1" / "dapo_export.json")
                              .read_text())["version"] == 1
            procs[1].kill()
            start = time.monotonic()
            code = procs[0].wait(timeout=heartbeat + 60)
            elapsed = time.monotonic() - start
        finally:
            for p in procs:
                p.kill()
    assert code != 0
    assert elapsed < heartbeat + 60
    log = (tmp_path / "process_0.log").read_text()
    assert "another task died" in log and "stopped sending heartbeats" in log, log[-3000:]


def _stop_ids(model: str) -> list[int]:
    from rollout.generation import stop_token_ids

    return stop_token_ids(model)


def test_a_process_that_never_joins_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dapo_jax.train", "--config", "configs/arith_tiny.py",
         f"--config.trainer.run_dir={tmp_path}",
         f"--config.mesh.coordinator_address=127.0.0.1:{sidecar.free_port()}",
         "--config.mesh.num_processes=2", "--config.mesh.process_id=1",
         "--config.mesh.initialization_timeout_s=3"],
        cwd=REPO, env=env(devices=1), capture_output=True, text=True,
        timeout=120)
    assert out.returncode != 0
    assert "did not assemble within 3 s (mesh.initialization_timeout_s" in out.stderr


FROM_PRIMARY = """
import json, sys
import jax
from jax.experimental import multihost_utils
from dapo_jax import multihost
port, pid, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if count > 1:
    multihost.initialize(multihost.DistributedConfig(f"127.0.0.1:{port}", count, pid, 60, 30))
moved = []
real = multihost_utils.broadcast_one_to_all
def counting(x, *a, **k):
    import numpy as np
    moved.append(int(np.asarray(x).nbytes))
    return real(x, *a, **k)
multihost_utils.broadcast_one_to_all = counting
payload = {"samples": list(range(5000)), "text": "x" * 20000}
got = multihost.from_primary(lambda: payload if multihost.is_primary() else None)
print(json.dumps({"ok": got == payload, "moved": moved}))
"""


@pytest.mark.slow
def test_from_primary_broadcasts_the_same_bytes_with_two_processes(tmp_path):
    """from_primary is a broadcast from process 0: every process gets the payload, and the
    buffers it moves are the payload's size (plus its 8-byte length), not process_count
    copies of it as an all-gather would."""
    script = tmp_path / "fp.py"
    script.write_text(FROM_PRIMARY)
    port = sidecar.free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), "2"],
                              env=env(devices=1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    size = len(pickle.dumps({"samples": list(range(5000)), "text": "x" * 20000}))
    for out in outs:
        assert out["ok"] and out["moved"] == [8, size], out
