"""Prompts -> rollouts -> rewards: the generation engines the trainer talks to, and one
rollout of a batch of prompts (generate n responses each, refuse stale weights, score).

Engines:
- `InProcessEngine`: the JAX generation engine in this process; weight sync hands it the new
  parameters cast to the rollout dtype (`generator.model_dtype`).
- `SidecarEngine`: rollout sidecars over HTTP (`rollout/`); weight sync writes an orbax
  export in the rollout dtype and pushes it to every sidecar.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx

from dapo_jax import multihost
from dapo_jax.generation import Generator, Sample, SamplingParams
from dapo_jax.placement import TOKEN_ENV
from dapo_jax.prompts import PromptSet
from dapo_jax.rewards import RewardPool


# ----------------------------------------------------------------------------- engines
class Engine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int,
                 keys: list[int]) -> list[list[Sample]]: ...

    def sync(self, model: Any, params: Any, step: int, version: int) -> None: ...


@jax.jit(static_argnames="dtype")
def cast_params(params: Any, dtype: str) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype), params)


class InProcessEngine:
    """The JAX generation engine in this process, serving the weights in `dtype`."""

    def __init__(self, graphdef: nnx.GraphDef, params: Any, dtype: str, **generator_kw: Any):
        self.dtype = dtype
        self.generator = Generator(graphdef, self._cast(params), **generator_kw)

    def _cast(self, params: Any) -> Any:
        same = all(x.dtype == self.dtype for x in jax.tree.leaves(params))
        return params if same else cast_params(params, dtype=self.dtype)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int,
                 keys: list[int]) -> list[list[Sample]]:
        return self.generator.generate(prompts, sampling, n, keys)

    def sync(self, model: Any, params: Any, step: int, version: int) -> None:
        del model, step
        self.generator.set_params(self._cast(params), version)


class SidecarEngine:
    """Rollout sidecars over HTTP; weight sync is an orbax export in `dtype` pushed to each.
    A sidecar that does not answer is retried for `retry_window_s` (a launcher restarts a
    dead one within its start-up timeout).

    With several JAX processes, process 0 is the only client: it sends every prompt (spread
    over the sidecars as with one process) and shares the samples with the others; every
    process writes its shards of the export (a filesystem all hosts and sidecars see), then
    process 0 pushes it."""

    def __init__(self, urls: list[str], token: str, export_dir: Path, dtype: str,
                 retry_window_s: float):
        from dapo_jax.rollout_client import RolloutClient

        self.client = RolloutClient(urls, token=token or os.environ.get(TOKEN_ENV) or None,
                                    retry_window_s=retry_window_s)
        self.export_dir = export_dir
        self.dtype = dtype

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int,
                 keys: list[int]) -> list[list[Sample]]:
        return multihost.from_primary(lambda: self.client.generate(prompts, sampling, n, keys))

    def sync(self, model: Any, params: Any, step: int, version: int) -> None:
        from dapo_jax.weight_export import export_weights

        nnx.update(model, params)
        path = export_weights(model, self.export_dir, step=step, version=version,
                              dtype=self.dtype)
        multihost.barrier(f"export_{step}")  # process 0 has renamed it into place
        if multihost.is_primary():
            self.client.update_weights(str(path), version)


# ----------------------------------------------------------------------------- rollouts
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


def rollout(engine: Engine, prompt_set: PromptSet, indices: list[int], sampling: SamplingParams,
            n: int, tokenizer: Any, rewards: RewardPool, version: int,
            timings: dict[str, float]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Generates n responses per prompt and scores them: one row per response, groups
    contiguous, and the reward pool's failure counts. Refuses samples generated with another
    weight version than `version`."""
    start = time.perf_counter()
    groups = versioned(engine, version)([prompt_set.ids[i] for i in indices], sampling, n,
                                        [int(i) for i in indices])
    timings["generate"] = timings.get("generate", 0.0) + time.perf_counter() - start
    samples = [s for g in groups for s in g]
    rows = np.repeat(np.asarray(indices), n)
    start = time.perf_counter()
    texts = [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in samples]
    results, stats = rewards.score(texts, [prompt_set.examples[i].ground_truth for i in rows])
    timings["reward"] = timings.get("reward", 0.0) + time.perf_counter() - start
    obj = lambda xs: np.array(xs + [None], dtype=object)[:-1]  # ragged rows, kept as lists
    return {
        "prompt_index": rows,
        "prompt_ids": obj([prompt_set.ids[i] for i in rows]),
        "response_ids": obj([s.token_ids for s in samples]),
        "rollout_logprobs": obj([s.logprobs for s in samples]),
        "text": obj(texts),
        "score": np.array([r.score for r in results], np.float32),
        "acc": np.array([r.acc for r in results], bool),
        # Did not end with a stop token: "length", or an engine's "abort" (SkyRL's rule for
        # overlong filtering: every finish reason but "stop").
        "truncated": np.array([s.finish_reason != "stop" for s in samples], bool),
    }, stats


def reward_metrics(drawn: list[tuple[dict[str, np.ndarray], dict[str, float]]],
                   n: int) -> dict[str, float]:
    """Reward metrics over EVERY response generated this step. (The batch dynamic sampling
    keeps holds only groups with mixed outcomes, so its accuracy drifts towards the middle
    whatever the policy does; it is reported separately as reward/kept_accuracy.)"""
    acc = np.concatenate([batch["acc"] for batch, _ in drawn])
    score = np.concatenate([batch["score"] for batch, _ in drawn])
    # pass@n: the prompt's group holds a correct response.
    out = {"reward/avg_raw_reward": float(score.mean()), "reward/accuracy": float(acc.mean()),
           f"reward/avg_pass_at_{n}": float(acc.reshape(-1, n).any(axis=1).mean())}
    for key in ("reward/timeouts", "reward/errors"):
        out[key] = float(sum(stats[key] for _, stats in drawn))
    return out
