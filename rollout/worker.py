"""Prompts -> rollouts -> rewards: one rollout of a batch of prompts (generate n responses
each, refuse stale weights, score) and the rollout worker (`RolloutWorker`), the producer of
generation batches: inline on the trainer's thread (synchronous DAPO) or in its own thread
running ahead of the trainer (`trainer.fully_async`). The engines are `rollout.engines`.

With several JAX processes (`SPLITS`) each process's worker produces its part of every
batch with no exchange between processes (collectives from two threads of a process would
interleave differently on each), and the trainer's thread gathers the parts.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np

from dapo_jax import multihost
from dapo_jax.prompts import PromptSampler, PromptSet, SamplerState
from dapo_jax.rewards import RewardPool, RewardResult, failure_counts
from rollout.engines import Engine
from rollout.generation import Sample, SamplingParams

# ----------------------------------------------------------------------------- rollouts
# How the processes of a multi-process trainer share a batch of prompts (one process: each
# is the whole batch on that process):
# - "collective": the engine is on the trainer's mesh, over every process: all of them
#   generate the whole batch together (inline only, on the trainer's thread), each scores
#   its share of the prompts;
# - "share": each process's engine has a generation mesh of its own devices: it generates
#   and scores its contiguous share of the prompts;
# - "primary": sidecars, with process 0 their only client: it generates and scores all.
SPLITS = ("collective", "share", "primary")


def part_of(split: str, n: int) -> slice:
    """This process's prompts (of n) under `split`."""
    if split == "primary":
        return slice(0, n) if multihost.is_primary() else slice(0, 0)
    return multihost.share(n)


def scored_rows(split: str, prompts: int, n: int) -> slice:
    """The rows of `rollout`'s part that this process scores: all of them, except under
    "collective" (every row on every process), where it is its share's."""
    if split != "collective":
        return slice(None)
    part = part_of(split, prompts)
    return slice(part.start * n, part.stop * n)


def versioned(engine: Engine, version: int) -> Any:
    """`engine.generate` that refuses samples generated with another weight version than
    `version` (stale or unknown weights are an error, never a silent rollout)."""
    def generate(prompts: list[list[int]], sampling: SamplingParams, n: int,
                 keys: list[int]) -> list[list[Sample]]:
        groups = engine.generate(prompts, sampling, n, keys)
        stale = {s.weight_version for g in groups for s in g} - {version}
        if stale:
            raise RuntimeError(f"rollout generated with weight version(s) {sorted(stale)}, "
                               f"expected {version}: refusing stale weights")
        return groups

    return generate


def gathered(generate: Any, split: str) -> Any:
    """`generate` whose result is every prompt's samples on every process, each process
    generating its part under `split` (a collective: the trainer's thread only)."""
    if split == "collective" or jax.process_count() == 1:
        return generate

    def run(prompts: list[list[int]], sampling: SamplingParams, n: int,
            keys: list[int]) -> list[list[Sample]]:
        if split == "primary":
            return multihost.from_primary(lambda: generate(prompts, sampling, n, keys)
                                          if multihost.is_primary() else None)
        return multihost.split_work(
            lambda part: generate(prompts[part], sampling, n, keys[part]), len(prompts))

    return run


def rollout(engine: Engine, prompt_set: PromptSet, indices: list[int], sampling: SamplingParams,
            n: int, tokenizer: Any, rewards: RewardPool, version: int,
            timings: dict[str, float], *, split: str
            ) -> tuple[dict[str, np.ndarray], list[RewardResult]]:
    """This process's part (`part_of(split, ...)`) of the rollout of `indices`: n responses
    per prompt, scored here, one row per response, groups contiguous; and the rows' reward
    failures (the caller checks the whole batch's). Refuses samples generated with another
    weight version than `version`. No exchange with other processes, except that the
    "collective" split generates the whole batch on the trainer's mesh: every process then
    holds every row, and scores only its share's (the others' score NaN until
    `RolloutWorker.next` gathers them)."""
    part = part_of(split, len(indices))
    ask = indices if split == "collective" else indices[part]
    start = time.perf_counter()
    groups = versioned(engine, version)([prompt_set.ids[i] for i in ask], sampling, n,
                                        [int(i) for i in ask]) if ask else []
    timings["generate"] = timings.get("generate", 0.0) + time.perf_counter() - start
    samples = [s for g in groups for s in g]
    rows = np.repeat(np.asarray(ask, np.int64), n)
    start = time.perf_counter()
    texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples]
    mine = scored_rows(split, len(indices), n)
    results = rewards.score_here(texts[mine],
                                 [prompt_set.examples[i].ground_truth for i in rows[mine]])
    score = np.full(len(rows), np.nan, np.float32)
    acc = np.zeros(len(rows), bool)
    score[mine] = [r.score for r in results]
    acc[mine] = [r.acc for r in results]
    timings["reward"] = timings.get("reward", 0.0) + time.perf_counter() - start
    obj = lambda xs: np.array(xs + [None], dtype=object)[:-1]  # ragged rows, kept as lists
    return {
        "prompt_index": rows,
        "prompt_ids": obj([prompt_set.ids[i] for i in rows]),
        "response_ids": obj([s.token_ids for s in samples]),
        "rollout_logprobs": obj([s.logprobs for s in samples]),
        "text": obj(texts),
        "score": score,
        "acc": acc,
        # Did not end with a stop token: "length", or an engine's "abort" (SkyRL's rule for
        # overlong filtering: every finish reason but "stop").
        "truncated": np.array([s.finish_reason != "stop" for s in samples], bool),
        "weight_version": np.array([s.weight_version for s in samples], np.int64),
    }, [r for r in results if r.status != "ok"]


def reward_metrics(drawn: list[GenerationBatch], n: int) -> dict[str, float]:
    """Reward metrics over EVERY response generated this step. (The batch dynamic sampling
    keeps holds only groups with mixed outcomes, so its accuracy drifts towards the middle
    whatever the policy does; it is reported separately as reward/kept_accuracy.)"""
    acc = np.concatenate([b.data["acc"] for b in drawn])
    score = np.concatenate([b.data["score"] for b in drawn])
    # pass@n: the prompt's group holds a correct response.
    return {"reward/avg_raw_reward": float(score.mean()), "reward/accuracy": float(acc.mean()),
            f"reward/avg_pass_at_{n}": float(acc.reshape(-1, n).any(axis=1).mean()),
            **failure_counts([f for b in drawn for f in b.failures])}


# ----------------------------------------------------------------------------- worker
def batch_seed(seed: int, number: int) -> int:
    """The sampling seed of the run's generation batch `number` (0, 1, ... over the whole
    run): a pure function of the batch's place, so a resumed run draws the batches that were
    not trained again with the same prompts and seeds."""
    return seed * 100_003 + number * 1009


@dataclasses.dataclass(frozen=True)
class GenerationBatch:
    number: int  # the run's generation batches, from 0
    indices: tuple[int, ...]  # its prompts (dataset positions)
    version: int  # the oldest weight version its responses were generated with
    data: dict[str, np.ndarray]  # `rollout`'s rows (weight_version per row)
    failures: tuple[RewardResult, ...]  # its responses' reward failures
    after: SamplerState  # the prompt order's position after this batch's prompts
    timings: dict[str, float]  # its generate and reward seconds (the slowest process's)

    @classmethod
    def merge(cls, parts: list[GenerationBatch]) -> GenerationBatch:
        """One batch from the processes' parts of it (in process order)."""
        first = parts[0]
        if any(p.number != first.number for p in parts):
            raise RuntimeError(f"the processes produced different generation batches: "
                               f"{[p.number for p in parts]}")
        return cls(first.number, first.indices, min(p.version for p in parts),
                   {k: np.concatenate([p.data[k] for p in parts]) for k in first.data},
                   tuple(f for p in parts for f in p.failures), first.after,
                   {k: max(p.timings.get(k, 0.0) for p in parts) for k in first.timings})


def staleness(step: int, version: int) -> int:
    """SkyRL's staleness of a group generated with weights `version` and trained at `step`:
    it was scheduled at step i = version + 1 (the step those weights were training for), so
    staleness = step - i = step - 1 - version (0 in the synchronous loop)."""
    return step - 1 - version


@dataclasses.dataclass
class Position:
    """Where the untrained generation batches start (what the checkpoint saves): the prompt
    order's position after the last new batch the trainer took, the next new batch's
    number, and the batches handed back to be generated again (number -> prompts) not
    trained yet."""

    sampler: SamplerState = dataclasses.field(default_factory=SamplerState)
    number: int = 0
    redo: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def to_host(self) -> dict[str, Any]:
        return {"sampler": dataclasses.asdict(self.sampler), "generation_batches": self.number,
                "regenerate": [[k, list(v)] for k, v in sorted(self.redo.items())]}

    @classmethod
    def from_host(cls, host: dict[str, Any]) -> Position:
        return cls(SamplerState(**host["sampler"]), host.get("generation_batches", 0),
                   {int(k): tuple(v) for k, v in host.get("regenerate", [])})


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    batch_size: int  # prompts per generation batch (trainer.train_batch_size)
    group_size: int  # responses per prompt
    sampling: SamplingParams  # the seed is batch_seed(seed, number)
    seed: int
    ahead: int  # trainer.fully_async.max_staleness_steps when async, else 0 (inline): the
    # staleness bound too
    split: str  # one of SPLITS: this process's part of each batch


class Taken(NamedTuple):
    """What `RolloutWorker.next` took: the batch to train, the seconds the trainer waited,
    and the batches handed back on the way (too stale; their generation time was spent)."""

    batch: GenerationBatch
    waited: float
    handed_back: tuple[GenerationBatch, ...]


@dataclasses.dataclass(frozen=True)
class _Job:
    """A scheduled generation batch."""

    indices: tuple[int, ...]
    number: int
    after: SamplerState


class RolloutWorker:
    """The producer of generation batches: `batch_size` prompts, `group_size` responses
    each with the newest weights published to it, scored.

    Which batches, in which order, is decided on the trainer's thread only (`_schedule`:
    batches handed back to be generated again first, then new prompts), so every process
    of a multi-process trainer produces the same sequence, each its part of every batch
    (`split`), and `next()` gathers the parts.

    `ahead` = 0: inline. `next()` generates on the caller's thread, with the weights the
    trainer published after its last update: the synchronous loop.
    `ahead` = k > 0: in its own thread, keeping up to k * b finished batches queued for the
    trainer, b the batches a step has taken on average over the last steps, rounded up
    (dynamic sampling draws more than one a step). A batch starts with the newest weights
    published, so a batch scheduled while the trainer is at step i (weights i - 1) is
    trained at a step j with j - i <= k (SkyRL's staleness, `max_staleness_steps`) whenever
    the steps take their b batches: it had at most k * b - 1 queued before it, taken within
    k - 1 steps if the trainer is still drawing step i's batches and within k if it is
    updating. (With one batch a step, b = 1, that is a guarantee; a step that takes fewer
    than b can leave a batch one step too stale: `next(step)` hands it back
    (`regenerate`), and the worker generates the same prompts, with the same seed, again
    with the newest weights.)

    The scheduling state lives here: the schedule (`sampler`, `number`, batches to redo)
    and the trainer's position (`position`: what it has taken, what is handed back), which
    `state()` gives the checkpoint and `position=` restores.

    One user of the engine at a time (`engine_lock`): the worker, or the trainer's held-out
    evaluation (`serving`). An error in the worker's thread is raised by the trainer's next
    `next()`; so are reward failures over the pool's bound (`RewardPool.check`)."""

    def __init__(self, engine: Engine, prompt_set: PromptSet, tokenizer: Any,
                 rewards: RewardPool, settings: WorkerSettings, *, version: int,
                 position: Position | None = None):
        if settings.split not in SPLITS:
            raise ValueError(f"split {settings.split!r} is not one of {SPLITS}")
        position = position or Position()
        self.engine, self.prompt_set = engine, prompt_set
        self.tokenizer, self.rewards, self.s = tokenizer, rewards, settings
        # The trainer's position (trainer thread only): what `state()` returns.
        self.position = Position(dataclasses.replace(position.sampler), position.number,
                                 dict(position.redo))
        # The schedule's position, ahead of the trainer's by the batches scheduled.
        self.sampler = PromptSampler(len(prompt_set.examples), seed=settings.seed,
                                     state=dataclasses.replace(position.sampler))
        self.version = version  # what the engine serves
        self.number = position.number  # the next new batch's number
        self.engine_lock = threading.Lock()
        self._cond = threading.Condition()
        self._todo: collections.deque[_Job] = collections.deque()  # scheduled, not started
        self._outstanding = 0  # scheduled and not yet returned by next()
        self._queue: collections.deque[GenerationBatch] = collections.deque()  # finished
        self._published: tuple[Any, int] | None = None  # newest weights, not loaded yet
        self._error: BaseException | None = None
        self._closed = False
        self._idle = 0.0  # seconds the engine waited between generation batches
        self._per_step: collections.deque[int] = collections.deque([1], maxlen=8)
        # Batches to generate again (prompts, number), scheduled before new prompts.
        self._redo: collections.deque[tuple[tuple[int, ...], int]] = collections.deque(
            (v, k) for k, v in sorted(position.redo.items()))
        self._last_end = time.perf_counter()
        self._thread: threading.Thread | None = None
        if settings.ahead > 0:
            self._schedule()
            self._thread = threading.Thread(target=self._run, name="rollout-worker",
                                            daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ trainer's side
    def publish(self, weights: Any, version: int) -> None:
        """Newer weights (`Engine.prepare`'s), taken up before the next batch starts."""
        with self._cond:
            self._published = (weights, version)

    def next(self, step: int) -> Taken:
        """The oldest finished batch fresh enough to train at `step` (every process's parts
        of it). A batch staler than the bound (`ahead`) is never trained: it is handed back
        (`regenerate`) and generated again, with its own seed and the newest weights,
        before new prompts."""
        waited, stale = 0.0, []
        while True:
            batch, wait = self._take()
            waited += wait
            if staleness(step, batch.version) <= self.s.ahead:
                return Taken(batch, waited, tuple(stale))
            stale.append(batch)
            self.regenerate(batch.indices, batch.number)

    def state(self) -> dict[str, Any]:
        """The trainer's position (`Position.to_host`): where a resumed run's worker starts
        (`Position.from_host`), so every batch not trained is generated again, none twice."""
        return self.position.to_host()

    def _take(self) -> tuple[GenerationBatch, float]:
        """The oldest finished batch, and the seconds the caller waited for it; moves the
        trainer's position past it."""
        start = time.perf_counter()
        if self._thread is None:
            self._schedule()
            mine = self._produce(self._todo.popleft())
            self._outstanding -= 1
        else:
            with self._cond:
                while not self._queue and self._error is None:
                    self._cond.wait()
                if self._error is not None:
                    raise self._error
                mine = self._queue.popleft()
                self._outstanding -= 1
                self._cond.notify_all()
            self._schedule()
        waited = time.perf_counter() - start
        batch = self._gather(mine)
        self.rewards.check(batch.failures, len(batch.data["score"]))
        pos = self.position
        if batch.number in pos.redo:
            del pos.redo[batch.number]
        else:  # new batches come in number order
            pos.sampler, pos.number = batch.after, batch.number + 1
        return batch, waited

    def regenerate(self, indices: tuple[int, ...], number: int) -> None:
        """Generate batch `number`'s prompts again (it came back too stale to train); the
        trainer's position keeps it until it trains."""
        self.position.redo[number] = tuple(indices)
        with self._cond:
            self._redo.append((tuple(indices), number))
        if self._thread is not None:
            self._schedule()

    def step_done(self, batches: int) -> None:
        """The trainer's step took `batches` generation batches (sizes the queue)."""
        with self._cond:
            self._per_step.append(batches)
            self._cond.notify_all()
        if self._thread is not None:
            self._schedule()

    def take_idle(self) -> float:
        """Seconds the engine sat between generation batches since the last call."""
        with self._cond:
            idle, self._idle = self._idle, 0.0
        return idle

    @contextlib.contextmanager
    def serving(self, version: int) -> Iterator[Any]:
        """A generate function (every prompt's samples on every process) on the engine,
        holding the newest published weights (`version`), for the caller alone while the
        block runs (the worker's thread waits)."""
        with self.engine_lock:
            self._take_up(version)
            yield gathered(versioned(self.engine, version), self.s.split)

    def flush(self, version: int) -> None:
        """The engine takes up the newest published weights (`version`) now, not at its next
        batch: the engines end a run on its last weights."""
        with self.engine_lock:
            self._take_up(version)

    def close(self, timeout_s: float = 60.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)  # a batch in flight finishes first

    def _capacity(self) -> int:
        return self.s.ahead * -(-sum(self._per_step) // len(self._per_step))

    def _schedule(self) -> None:
        """The trainer's thread: schedules batches (handed back ones first, then new
        prompts) until `capacity` + 1 are outstanding (the queue's worth and one in
        flight), one when inline. Only trainer-thread events move these counts, so every
        process schedules the same batches in the same order."""
        with self._cond:
            want = self._capacity() + 1 if self.s.ahead > 0 else 1
            while self._outstanding < want:
                if self._redo:
                    indices, number = self._redo.popleft()
                else:
                    indices = tuple(self.sampler.next_batch(self.s.batch_size))
                    number, self.number = self.number, self.number + 1
                self._todo.append(_Job(indices, number, dataclasses.replace(self.sampler.state)))
                self._outstanding += 1
            self._cond.notify_all()

    def _gather(self, mine: GenerationBatch) -> GenerationBatch:
        """Every process's part of this batch (the trainer's thread: a collective)."""
        if jax.process_count() == 1:
            return mine
        if self.s.split == "primary":
            return multihost.from_primary(lambda: mine)
        if self.s.split == "collective":  # every process has every row: only scores move
            rows = scored_rows("collective", len(mine.indices), self.s.group_size)
            parts = multihost.allgather_objects(
                (mine.data["score"][rows], mine.data["acc"][rows], mine.failures))
            return dataclasses.replace(mine, failures=tuple(f for p in parts for f in p[2]),
                                       data={**mine.data,
                                             "score": np.concatenate([p[0] for p in parts]),
                                             "acc": np.concatenate([p[1] for p in parts])})
        return GenerationBatch.merge(multihost.allgather_objects(mine))

    # ------------------------------------------------------------------ producer
    def _take_up(self, version: int) -> None:
        """Loads the newest published weights, which must be `version` (engine_lock held)."""
        self._load_newest()
        if self.version != version:
            raise RuntimeError(f"the engine serves weight version {self.version}, the "
                               f"trainer is at {version}")

    def _load_newest(self) -> None:
        with self._cond:
            published, self._published = self._published, None
        if published is not None:
            self.engine.load(*published)
            self.version = published[1]

    def _produce(self, job: _Job) -> GenerationBatch:
        """This process's part of the scheduled batch, with the newest published weights."""
        with self.engine_lock:
            self._load_newest()
            start = time.perf_counter()
            with self._cond:
                self._idle += start - self._last_end
            sampling = dataclasses.replace(self.s.sampling,
                                           seed=batch_seed(self.s.seed, job.number))
            timings: dict[str, float] = {}
            data, failures = rollout(self.engine, self.prompt_set, list(job.indices), sampling,
                                     self.s.group_size, self.tokenizer, self.rewards,
                                     self.version, timings, split=self.s.split)
            self._last_end = time.perf_counter()
            return GenerationBatch(job.number, job.indices, self.version, data,
                                   tuple(failures), job.after, timings)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._closed and (
                            not self._todo or len(self._queue) >= self._capacity()):
                        self._cond.wait()
                    if self._closed:
                        return
                    job = self._todo.popleft()
                batch = self._produce(job)
                with self._cond:
                    self._queue.append(batch)
                    self._cond.notify_all()
        except BaseException as e:  # the trainer raises it from next()
            with self._cond:
                self._error = e
                self._cond.notify_all()
