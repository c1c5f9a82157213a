"""One training step on a kept rollout batch, on the host:

    soft overlong punishment -> advantages -> each mini-batch laid out in rows (packed or
    padded, `batch.py`) with overlong filtering -> one transfer to the devices -> old (and
    reference) log-probs, recomputed there -> mini-batch updates -> one fetch of the metrics

`TrainState` is what a step replaces; `StepSettings` is what it reads of the run's settings
(`StepSettings.from_settings`); everything inside jit lives in `update.py`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np

from dapo_jax.train import advantages as adv_lib
from dapo_jax.train.batch import (
    Layout,
    build_rows,
    lengths,
    make_layout,
    place_response_values,
    place_sequence_values,
)
from dapo_jax.train.settings import Settings, Sizes
from dapo_jax.train.shaping import overlong_filter, soft_overlong_penalty
from dapo_jax.train.update import TrainFns


@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a step replaces: the policy's weights and AdamW state (donated to the update:
    the old ones are gone once a step ran), the last step trained and the weight version
    the engines are to serve (each step's weights are a new version)."""

    params: Any
    opt_state: Any
    step: int
    version: int


@dataclasses.dataclass(frozen=True)
class StepSettings:
    group_size: int  # generator.n_samples_per_prompt
    max_prompt_length: int
    max_generate_length: int
    mini_batch_size: int  # sequences per optimiser step: policy_mini_batch_size x group_size
    update_epochs: int
    advantage_estimator: str  # grpo | rloo
    grpo_norm_by_std: bool
    overlong_buffer_len: int  # 0: no soft overlong punishment
    overlong_penalty_factor: float
    apply_overlong_filtering: bool
    use_kl_loss: bool
    pad_id: int
    packing: bool  # trainer.use_sample_packing
    micro_batch_rows: int  # rows of one update micro-batch, all devices
    shards: int  # data-parallel devices the rows split over

    @classmethod
    def from_settings(cls, s: Settings, *, sizes: Sizes, pad_id: int) -> StepSettings:
        alg = s.algorithm
        return cls(
            group_size=s.rollout.n_samples_per_prompt,
            max_prompt_length=s.rollout.max_prompt_length,
            max_generate_length=s.rollout.max_generate_length, mini_batch_size=sizes.mini_rows,
            update_epochs=s.schedule.update_epochs_per_batch,
            advantage_estimator=alg.advantage_estimator, grpo_norm_by_std=alg.grpo_norm_by_std,
            overlong_buffer_len=alg.overlong_buffer_len,
            overlong_penalty_factor=alg.overlong_penalty_factor,
            apply_overlong_filtering=s.rollout.apply_overlong_filtering,
            use_kl_loss=s.loss.use_kl_loss, pad_id=pad_id,
            packing=s.schedule.use_sample_packing, micro_batch_rows=sizes.micro_rows,
            shards=max(sizes.dp, 1))


def shaped_advantages(batch: dict[str, np.ndarray], s: StepSettings
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(shaped rewards, one advantage per response): correctness scores plus the soft
    overlong penalty, then group-relative advantages over each prompt's responses."""
    rewards = batch["score"].astype(np.float32)
    if s.overlong_buffer_len > 0:
        rewards = rewards + soft_overlong_penalty(
            lengths(batch["response_ids"]), s.max_generate_length, s.overlong_buffer_len,
            s.overlong_penalty_factor)
    # Dynamic sampling's groups: replace's copies join their source (`accumulate` gives
    # every batch its group ids).
    group_ids = batch["group_id"]
    estimator = adv_lib.ADVANTAGE_ESTIMATORS[s.advantage_estimator]
    kwargs = {"norm_by_std": s.grpo_norm_by_std} if s.advantage_estimator == "grpo" else {}
    return rewards, estimator(rewards, np.asarray(group_ids), **kwargs)


def mini_batch_rows(batch: dict[str, np.ndarray], advantages: np.ndarray, s: StepSettings
                    ) -> tuple[list[Layout], list[dict[str, np.ndarray]]]:
    """The update's mini-batches (consecutive `mini_batch_size` sequences, so prompt groups
    stay whole), each laid out in its own padded or packed rows with loss mask (overlong
    filtering applied), advantages and rollout log-probs (TIS weights and the trainer vs
    sampler metric). Every mini-batch gets the same number of rows, the largest bucket among
    them (empty rows fill the others): one shape, one compilation, per step."""
    n = len(batch["score"])
    if n % s.mini_batch_size:
        raise ValueError(f"rollout batch of {n} sequences does not split into mini-batches of "
                         f"{s.mini_batch_size}")
    parts = [slice(lo, lo + s.mini_batch_size) for lo in range(0, n, s.mini_batch_size)]
    layouts = [make_layout(batch["prompt_ids"][p], batch["response_ids"][p],
                           max_prompt_length=s.max_prompt_length,
                           max_response_length=s.max_generate_length, packed=s.packing,
                           micro_batch_rows=s.micro_batch_rows, shards=s.shards)
               for p in parts]
    num_rows = max(layout.num_rows for layout in layouts)
    layouts = [dataclasses.replace(layout, num_rows=num_rows) for layout in layouts]
    out = []
    for layout, part in zip(layouts, parts, strict=True):
        rows = build_rows(layout, batch["prompt_ids"][part], batch["response_ids"][part],
                          s.pad_id)
        if s.apply_overlong_filtering:
            truncated = place_sequence_values(layout, batch["truncated"][part]) > 0
            rows["loss_mask"] = overlong_filter(rows["loss_mask"], truncated)
        rows["advantages"] = place_sequence_values(layout, advantages[part]) * rows["loss_mask"]
        rows["rollout_logprobs"] = place_response_values(layout, batch["rollout_logprobs"][part])
        out.append(rows)
    return layouts, out


class _Phases:
    """Wall time of the step's phases, into `timings` (the step's timing/* metrics)."""

    def __init__(self, timings: dict[str, float]):
        self.timings, self.last = timings, time.perf_counter()

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now


def train_step(batch: dict[str, np.ndarray], state: TrainState, *, ref_params: Any,
               fns: TrainFns, settings: StepSettings, timings: dict[str, float]
               ) -> tuple[TrainState, dict[str, float]]:
    """Shaping, advantages, old log-probs and the mini-batch updates of one step; returns
    the next state (the next step, a new weight version) and the step's metrics.

    Host work and device traffic are bounded per step, whatever the batch: the rows of every
    mini-batch go to the devices in one transfer, the old (and reference) log-probs stay
    there in the update's layout, and the metrics of every update come back in one fetch.
    The devices are waited on after the transfer, the log-prob pass and the updates, so
    that each phase's time (timing/layout, transfer, logprobs, update, metrics) is its
    own."""
    s, params, opt_state = settings, state.params, state.opt_state
    clock = _Phases(timings)
    rewards, adv = shaped_advantages(batch, s)
    layouts, host_rows = mini_batch_rows(batch, adv, s)
    clock.done("layout")
    minis = jax.block_until_ready(fns.put(host_rows))
    clock.done("transfer")
    for m in minis:
        m["old_logprobs"] = fns.logprobs(params, m["input_ids"], m["segment_ids"],
                                         m["positions"])
        if s.use_kl_loss:
            m["ref_logprobs"] = fns.logprobs(ref_params, m["input_ids"], m["segment_ids"],
                                             m["positions"])
    jax.block_until_ready(minis)
    clock.done("logprobs")
    per_update = []
    for _ in range(s.update_epochs):
        for m in minis:
            params, opt_state, metrics = fns.update(params, opt_state, m)
            per_update.append(metrics)
    jax.block_until_ready(params)
    clock.done("update")
    step_metrics = jax.device_get(per_update)  # the step's one device -> host fetch
    clock.done("metrics")
    for k, v in step_metrics[-1].items():
        if not np.isfinite(v):
            raise FloatingPointError(f"update produced non-finite {k}={v}; stopping before "
                                     "anything is written")
    mean = lambda k: float(np.mean([m[k] for m in step_metrics]))
    # The layouts hold every sequence's lengths, in batch order.
    response_len = np.concatenate([x.response_len for x in layouts])
    real_tokens = sum(int((x.prompt_len + x.response_len).sum()) for x in layouts)
    out: dict[str, float] = {
        "reward/kept_accuracy": float(batch["acc"].mean()),
        "reward/avg_shaped_reward": float(rewards.mean()),
        "generate/avg_response_length": float(response_len.mean()),
        "generate/max_response_length": float(response_len.max()),
        "generate/truncated_frac": float(batch["truncated"].mean()),
        # Trainer vs sampler log-probs, mean |old - rollout| over the trained tokens.
        "rollout/logprob_abs_diff": mean("rollout_abs_diff"),
        "policy/lr": float(step_metrics[-1]["lr"]),
        # Real (prompt + response) tokens over the tokens the update computed on.
        "batch/token_efficiency": real_tokens / sum(x.num_rows * x.row_length
                                                    for x in layouts),
    }
    for key in ("pg_loss", "loss", "grad_norm", "entropy", "approx_kl", "clip_frac_high",
                "clip_frac_low", "dual_clip_frac", "ratio", "kl_loss", "tis_weight"):
        if key in step_metrics[-1]:
            out[f"policy/{key}"] = mean(key)
    return TrainState(params, opt_state, state.step + 1, state.version + 1), out
