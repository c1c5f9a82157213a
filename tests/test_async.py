"""Asynchronous DAPO (trainer.fully_async): the rollout worker generates ahead of the
trainer on devices the trainer does not use (here 8 simulated devices split 4 / 4)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from configs import arith_tiny
from dapo_jax.prompts import PromptSampler
from dapo_jax.train import config as config_lib
from dapo_jax.train import loop
from dapo_jax.train.settings import Settings
from tests import launching

SPLIT = {"trainer.placement.colocate_all": False,
         "trainer.placement.policy_num_gpus_per_node": 4}


def trained_groups(run_dir: Path) -> dict[int, dict]:
    """step -> its trained prompts and their weight versions (a resumed run's line for a
    step replaces the killed run's)."""
    rows = [json.loads(line) for line in open(run_dir / "trained_groups.jsonl")]
    return {r["step"]: r for r in rows}


# Staleness 1 on the split mesh, the main job's data and dynamic sampling (filter), held-out
# eval at steps 0 and 20.
ASYNC_RUN = {"trainer.eval_before_train": True, "trainer.eval_interval": 20,
             "trainer.hf_save_interval": 0, "data.builtin_val_size": 128, **SPLIT,
             "trainer.fully_async.enabled": True, "trainer.fully_async.max_staleness_steps": 1,
             "trainer.algorithm.use_tis": True, "trainer.ckpt_interval": 1}


def _train(run_dir: Path, steps: int) -> subprocess.Popen:
    flags = {**ASYNC_RUN, "trainer.max_steps": steps, "trainer.run_dir": run_dir}
    return subprocess.Popen(
        [sys.executable, "-m", "dapo_jax.train", "--config", "configs/arith_tiny.py",
         *[f"--config.{k}={v}" for k, v in flags.items()]], cwd=launching.REPO,
        env=launching.env(devices=8), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)


@pytest.mark.slow
def test_staleness_1_learns_stays_in_bound_and_a_kill_9_resume_trains_every_prompt_once(
        tmp_path):
    """Killed at step 3 with batches queued and in flight, the resumed run takes every
    generation batch of the sampler's order once (dynamic sampling keeps or filters its
    groups; a batch handed back as too stale is taken later or is still pending at the end),
    and trains no prompt twice; every trained group is within the bound; held-out accuracy
    rises by the learning test's margin (test_trainer: 0.10 is 3.7 sd of two evaluations'
    resampling noise) in 20 steps."""
    run_dir, steps = tmp_path / "run", 20
    proc = _train(run_dir, steps)
    launching.wait_for(lambda: (run_dir / "trained_groups.jsonl").exists() and
                       max(trained_groups(run_dir)) >= 3, 600, proc, "step 3")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _train(run_dir, steps)
    _, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err[-3000:]
    groups = trained_groups(run_dir)
    assert sorted(groups) == list(range(1, steps + 1))
    taken = [b for s in range(1, steps + 1) for b in groups[s]["batches"]]
    pending = groups[steps]["regenerate"]
    assert len(set(taken)) == len(taken) and not set(taken) & set(pending)
    assert sorted(taken + pending) == list(range(len(taken) + len(pending)))  # none lost
    cfg = arith_tiny.get_config()
    train_set = loop.prompt_set(
        Settings.from_config(config_lib.apply_overrides(cfg, ASYNC_RUN)).data,
        AutoTokenizer.from_pretrained(cfg.model.path), "train")
    order = PromptSampler(len(train_set.examples), seed=cfg.trainer.seed)
    batch_prompts = [order.next_batch(cfg.trainer.train_batch_size)
                     for _ in range(len(taken) + len(pending))]
    trained = [i for s in range(1, steps + 1) for i in groups[s]["prompt_index"]]
    assert len(set(trained)) == len(trained)  # no prompt twice (4096 prompts: one epoch)
    for step in range(1, steps + 1):
        g = groups[step]
        assert len(g["prompt_index"]) == cfg.trainer.train_batch_size
        # What a step trains is what it drew: the prompts of the batches it took.
        assert set(g["prompt_index"]) <= {i for b in g["batches"] for i in batch_prompts[b]}
        # Trained at `step` with weights >= step - 2: staleness step - 1 - version <= 1.
        assert min(g["weight_version"]) >= step - 2
    rows = launching.read_metrics(run_dir)
    metrics = {r["step"]: r for r in rows if r["step"] > 0}
    assert all(m["async/staleness_max"] <= 1 for m in metrics.values())
    # The worker did run ahead: some batch was generated while the trainer updated.
    assert max(m["async/staleness_max"] for m in metrics.values()) == 1
    assert max(m["dynamic_sampling/batches_drawn"] for m in metrics.values()) > 1
    evals = {r["step"]: r["eval/all/accuracy"] for r in rows if "eval/all/accuracy" in r}
    assert sorted(evals) == [0, steps]
    assert evals[steps] >= evals[0] + 0.10, evals


class _Engine:
    """Samples whose tokens are the prompt's key and the seed; serves what it was loaded."""

    def __init__(self):
        self.version = 0

    def load(self, weights, version):
        self.version = version

    def generate(self, prompts, sampling, n, keys):
        from rollout.generation import Sample

        return [[Sample([k, sampling.seed], [0.0, 0.0], "stop", self.version)] * n
                for k in keys]


class _Rewards:
    def score_here(self, texts, truths):
        from dapo_jax.rewards import RewardResult

        return [RewardResult(1.0, True)] * len(texts)

    def check(self, failed, total):
        assert not failed


class _Tokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return str(ids)


def test_a_batch_handed_back_is_generated_again_first_with_its_seed_and_new_weights():
    """Inline worker (the same code as the thread): regenerate(prompts, number) puts that
    batch before new prompts; it carries the newest weights and its own seed; the worker's
    state() (the checkpoint's) keeps batches handed back until they train, and a worker
    started from it schedules what was not trained, none twice."""
    from dapo_jax.prompts import Example, PromptSet
    from rollout.generation import SamplingParams
    from rollout.worker import Position, RolloutWorker, WorkerSettings, batch_seed

    prompts = PromptSet([Example((("user", str(i)),), str(i)) for i in range(10)],
                        [[i] for i in range(10)], 0, 0)
    settings = WorkerSettings(batch_size=3, group_size=2, sampling=SamplingParams(), seed=5,
                              ahead=0, split="collective")
    worker = RolloutWorker(_Engine(), prompts, _Tokenizer(), _Rewards(), settings, version=0)
    first = worker.next(1).batch
    second = worker.next(1).batch
    assert (first.number, second.number) == (0, 1) and first.version == 0
    worker.publish("w1", 1)
    worker.regenerate(first.indices, first.number)
    worker.regenerate(second.indices, second.number)
    assert sorted(Position.from_host(worker.state()).redo) == [0, 1]
    again = worker.next(2).batch
    assert (again.number, again.indices, again.version) == (0, first.indices, 1)
    assert again.data["response_ids"][0] == [first.indices[0], batch_seed(5, 0)]
    assert again.after == second.after  # the prompt order did not move
    state = json.loads(json.dumps(worker.state()))  # what a checkpoint holds
    assert Position.from_host(state) == Position(second.after, 2, {1: second.indices})
    third = worker.next(2).batch
    assert third.number == 1 and third.indices == second.indices
    fourth = worker.next(2).batch
    assert fourth.number == 2 and set(fourth.indices).isdisjoint(first.indices + second.indices)

    engine = _Engine()
    engine.load("w1", 1)  # a resumed run's engine serves the checkpoint's weights
    resumed = RolloutWorker(engine, prompts, _Tokenizer(), _Rewards(), settings,
                            version=1, position=Position.from_host(state))
    assert [(b.number, b.indices) for b in (resumed.next(2).batch, resumed.next(2).batch)] == [
        (1, second.indices), (2, fourth.indices)]


class _StartedEngine(_Engine):
    """Says when its first generation started (its weight version is fixed then)."""

    def __init__(self):
        import threading

        super().__init__()
        self.started = threading.Event()

    def generate(self, prompts, sampling, n, keys):
        self.started.set()
        return super().generate(prompts, sampling, n, keys)


def test_a_batch_staler_than_the_bound_is_handed_back_not_trained():
    """next(step) never returns a batch staler than the bound (ahead = 1): it hands it back,
    the worker generates the same prompts again with the newest weights after what was
    already scheduled, and the checkpoint's state keeps it until it trains."""
    from dapo_jax.prompts import Example, PromptSet
    from rollout.generation import SamplingParams
    from rollout.worker import Position, RolloutWorker, WorkerSettings

    prompts = PromptSet([Example((("user", str(i)),), str(i)) for i in range(10)],
                        [[i] for i in range(10)], 0, 0)
    engine = _StartedEngine()
    worker = RolloutWorker(engine, prompts, _Tokenizer(), _Rewards(), WorkerSettings(
        batch_size=3, group_size=2, sampling=SamplingParams(), seed=5, ahead=1,
        split="share"), version=0)
    try:
        assert engine.started.wait(60)  # batch 0 is being generated with version 0
        worker.publish("w2", 2)
        taken = worker.next(3)  # batch 0: staleness 3 - 1 - 0 = 2 > 1
        assert [(b.number, b.version) for b in taken.handed_back] == [(0, 0)]
        assert (taken.batch.number, taken.batch.version) == (1, 2)
        assert sorted(Position.from_host(worker.state()).redo) == [0]
        assert worker.next(3).batch.number == 2  # scheduled before the hand-back
        again = worker.next(3)
        assert again.handed_back == () and (again.batch.number, again.batch.version) == (0, 2)
        assert again.batch.indices == taken.handed_back[0].indices
        assert Position.from_host(worker.state()).redo == {}
    finally:
        worker.close()


class _SlowEngine(_Engine):
    def generate(self, prompts, sampling, n, keys):
        import time

        time.sleep(0.02)
        return super().generate(prompts, sampling, n, keys)


def test_the_batches_a_worker_produces_do_not_depend_on_its_speed():
    """Every process of a multi-process trainer runs its own worker thread and the trainer
    gathers their parts of each batch: which batch comes next must follow from the
    trainer's calls alone (scheduled on its thread), not from how far each worker got when
    a batch was handed back."""
    from dapo_jax.prompts import Example, PromptSet
    from rollout.generation import SamplingParams
    from rollout.worker import RolloutWorker, WorkerSettings

    prompts = PromptSet([Example((("user", str(i)),), str(i)) for i in range(40)],
                        [[i] for i in range(40)], 0, 0)

    def trace(engine) -> list[tuple[int, tuple[int, ...]]]:
        worker = RolloutWorker(
            engine, prompts, _Tokenizer(), _Rewards(),
            WorkerSettings(batch_size=4, group_size=2, sampling=SamplingParams(), seed=5,
                           ahead=2, split="share"), version=0)
        seen = []
        try:
            for step in range(6):
                got = worker.next(1).batch
                seen.append((got.number, got.indices))
                if step in (1, 2):  # handed back while the worker is some way ahead
                    worker.regenerate(got.indices, got.number)
                got = worker.next(1).batch
                seen.append((got.number, got.indices))
                worker.step_done(2 if step % 2 else 1)
        finally:
            worker.close()
        return seen

    fast, slow = trace(_Engine()), trace(_SlowEngine())
    assert fast == slow
    numbers = [n for n, _ in fast]
    assert numbers.count(2) == 2 and numbers.count(4) == 2  # each handed-back batch again
