"""The launcher's failure paths: Ctrl-C, a killed launcher, a sidecar dying mid-run (restarted,
or the run stops), a sidecar that never becomes healthy. Each case checks that no child
process group survives."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests import launching

# The embedded default job, generating through one JAX sidecar, on one CPU device.
BASE = {"generator.backend": "sidecar", "generator.sidecar_engine": "jax",
        "generator.num_inference_engines": 1, "trainer.eval_before_train": False,
        "trainer.eval_interval": 0, "trainer.ckpt_interval": 0,
        "generator.sidecar_startup_timeout_s": 300}


def launch(tmp_path, **over):
    cmd = launching.launch_cmd("configs/arith_tiny.py", {
        **BASE, "trainer.run_dir": tmp_path / "run",
        "trainer.compilation_cache_dir": tmp_path / "jax_cache", **over})
    return subprocess.Popen(cmd, cwd=launching.REPO, env=launching.env(devices=1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def launch_and_train(tmp_path, **over):
    """A launcher whose trainer has logged its first step, and its run directory."""
    proc = launch(tmp_path, **over)
    run_dir = tmp_path / "run"
    launching.wait_for(lambda: any(r["step"] >= 1 for r in launching.read_metrics(run_dir)),
                       300, proc, "the first step")
    return proc, run_dir


@pytest.mark.slow
def test_ctrl_c_stops_trainer_and_sidecars(tmp_path):
    proc, run_dir = launch_and_train(tmp_path, **{"trainer.max_steps": 1000})
    groups = launching.child_groups(run_dir)
    assert len(groups) == 2  # trainer + one sidecar
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends to the launcher
    _, err = proc.communicate(timeout=300)  # an event (the exit), not a speed: a loaded
    # machine takes longer to tear down a trainer mid-compile
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    assert launching.manifest(run_dir)["closed"]
    launching.wait_groups_gone(groups, 5)


def test_killed_launcher_leaves_no_children(tmp_path):
    """Killed with -9 once its children are all up (the sidecar serving, the trainer with its
    reward workers): no clean-up code runs in the launcher, each child watches its parent."""
    proc = launch(tmp_path, **{"trainer.max_steps": 1000})
    run_dir = tmp_path / "run"
    launching.wait_for(lambda: launching.manifest(run_dir).get("trainer_pids"), 300, proc,
                       "the trainer's start")
    trainer = launching.manifest(run_dir)["trainer_pids"][0]
    launching.wait_for(lambda: launching.group_size(trainer) >= 3, 300, proc,
                       "the trainer's 2 reward workers")
    groups = launching.child_groups(run_dir)
    assert len(groups) == 2
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    launching.wait_groups_gone(groups, 15)


def last_step(run_dir) -> int:
    return max((r["step"] for r in launching.read_metrics(run_dir)), default=0)


@pytest.mark.slow
def test_a_sidecar_that_dies_is_restarted_until_its_restarts_run_out(tmp_path):
    """generator.sidecar_max_restarts=1: killed once, the sidecar is restarted (on the base
    weights: the trainer pushes the current export before generating again) and the run
    trains on; killed again, the run stops, naming the sidecar, with its log's tail."""
    proc, run_dir = launch_and_train(tmp_path, **{"trainer.max_steps": 1000,
                                                  "generator.sidecar_max_restarts": 1})
    first = launching.manifest(run_dir)["sidecars"][0]["pid"]
    os.killpg(first, signal.SIGKILL)
    launching.wait_for(lambda: launching.manifest(run_dir)["sidecars"][0]["pid"] != first,
                       300, proc, "the restart")
    # The step in flight may have generated before the kill; the one after it cannot.
    after = last_step(run_dir)
    launching.wait_for(lambda: last_step(run_dir) >= after + 2, 600, proc,
                       "two steps after the restart")
    manifest = launching.manifest(run_dir)
    log = open(manifest["sidecars"][0]["log"]).read().split("==>")[-1]
    assert "loaded weights version" in log
    groups = launching.child_groups(run_dir)
    os.killpg(manifest["sidecars"][0]["pid"], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "sidecar 0 died with code -9; restart 1 of 1" in err
    assert "sidecar 0 (port" in err and "died with code -9 after 1 restart(s)" in err
    assert "stopping the run" in err and "serving jax engine" in err  # its log's tail
    assert any((tmp_path / "jax_cache").iterdir())  # one CPU device: the cache is on
    launching.wait_groups_gone(groups + [first], 5)


def test_async_through_a_jax_sidecar_stays_in_its_bound(tmp_path):
    """trainer.fully_async with the sidecar on its own device: the worker pushes each
    export between its requests; every trained group is within the staleness bound."""
    proc = launch(tmp_path, **{"trainer.placement.colocate_all": False,
                               "trainer.placement.policy_num_gpus_per_node": 1,
                               "trainer.fully_async.enabled": True,
                               "trainer.fully_async.max_staleness_steps": 1,
                               "trainer.algorithm.use_tis": True, "trainer.max_steps": 4})
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    rows = launching.read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["async/staleness_max"] <= 1 for r in rows)
    groups = [json.loads(line) for line in open(tmp_path / "run" / "trained_groups.jsonl")]
    assert all(min(g["weight_version"]) >= g["step"] - 2 for g in groups)
    assert "use_tis" not in err  # no warning: the correction is on


def test_sidecar_that_never_becomes_healthy_is_a_clear_error(tmp_path):
    proc = launch(tmp_path, **{"generator.sidecar_startup_timeout_s": 0.5})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "did not answer /health within 0.5 s (generator.sidecar_startup_timeout_s)" in err
    assert "rollout.server" in err  # the tail of its log: the command it ran
    launching.wait_groups_gone(launching.child_groups(tmp_path / "run"), 5)


def test_sidecar_that_exits_at_start_is_a_clear_error(tmp_path):
    proc = launch(tmp_path, **{"generator.sidecar_engine": "vllm",
                               "generator.sidecar_python": "/bin/false"})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "sidecar 0 (GPUs [0], port" in err and "exited with code 1 before becoming healthy" \
        in err


def test_launcher_refuses_what_it_cannot_run(tmp_path):
    out = subprocess.run(launching.launch_cmd("configs/arith_tiny.py", {}), cwd=launching.REPO,
                         env=launching.env(devices=1), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "generator.backend='jax'" in out.stderr
    out = subprocess.run(launching.launch_cmd("configs/arith_tiny.py", {
        "trainer.placement.colocate_all": False,
        "trainer.placement.policy_num_gpus_per_node": 2}) + ["--num_processes=2"],
        cwd=launching.REPO, env=launching.env(devices=1), capture_output=True, text=True,
        timeout=120)
    assert out.returncode != 0 and "start one `python -m dapo_jax.train` per host" in out.stderr
    out = subprocess.run(launching.launch_cmd("configs/arith_tiny.py", {
        **BASE, "trainer.xla_memory_fraction": 0.9}), cwd=launching.REPO,
        env=launching.env(devices=1), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "trainer.xla_memory_fraction: colocated trainer and sidecars" in out.stderr


def test_trainer_crash_ends_the_sidecars_and_returns_its_code(tmp_path):
    """The trainer fails in its set-up (a reward function that does not exist): the launcher
    returns its exit code and ends the sidecar."""
    proc = launch(tmp_path, **{"reward.fn": "no_such_module:score"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "no_such_module" in err
    manifest = launching.manifest(tmp_path / "run")
    assert manifest["closed"] and manifest["trainer_pids"]
    launching.wait_groups_gone(launching.child_groups(tmp_path / "run"), 5)


NO_MODEL = ("configs/dapo_qwen3_1p7b.py", {}, "error: model.path: /models/Qwen3-1.7B-Base")
# The embedded model has 256 positions; the config's rows 2,048 + 8,192 tokens.
FEW_POSITIONS = ("configs/dapo_qwen3_1p7b.py", {"model.path": launching.ASSET},
                 "error: generator.sampling_params.max_generate_length")
# A kernel that does not compile here, asked for by name: the trainer finds out when it has
# its devices, before any compute.
NO_KERNEL = ("configs/arith_tiny.py", {"model.attention_impl": "tokamax_mosaic"},
             "error: model.attention_impl=tokamax_mosaic: tokamax_mosaic is an NVIDIA GPU "
             "kernel and the target is cpu; use model.attention_impl=auto or xla")


@pytest.mark.parametrize("module,case", [
    ("dapo_jax.launch", NO_MODEL), ("dapo_jax.launch", FEW_POSITIONS),
    ("dapo_jax.train", NO_MODEL), ("dapo_jax.train", FEW_POSITIONS),
    ("dapo_jax.train", NO_KERNEL)])
def test_config_errors_are_one_line(tmp_path, module, case):
    """A config error from either entry point is one line naming the key, no traceback."""
    config, over, line = case
    cmd = launching.launch_cmd(config, {**over, "trainer.run_dir": tmp_path / "run"})
    cmd[cmd.index("dapo_jax.launch")] = module
    out = subprocess.run(cmd, cwd=launching.REPO, env=launching.env(devices=1),
                         capture_output=True, text=True, timeout=300)
    err = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and err and err[-1].startswith(line), \
        out.stderr[-3000:]
    assert [ln for ln in err if ln.startswith("error:")] == err[-1:], out.stderr[-3000:]


def test_launcher_without_sidecars_or_processes_is_one_line(tmp_path):
    out = subprocess.run(launching.launch_cmd("configs/arith_tiny.py", {
        "trainer.run_dir": tmp_path / "run"}), cwd=launching.REPO,
        env=launching.env(devices=1), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith("error: generator.backend: dapo_jax.launch starts rollout "
                                 "sidecars"), out.stderr
