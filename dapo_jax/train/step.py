"""One training step on a kept rollout batch, on the host:

    soft overlong punishment -> advantages -> each mini-batch laid out in rows (packed or
    padded, `batch.py`) with overlong filtering -> old (and reference) log-probs,
    recomputed -> mini-batch updates -> metrics

`StepSettings` is what the step reads from the config, typed and converted once at the
boundary (`StepSettings.from_config`); everything inside jit lives in `update.py`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from dapo_jax.multihost import to_host
from dapo_jax.train import advantages as adv_lib
from dapo_jax.train.batch import (
    Layout,
    bucketed_rows,
    build_rows,
    make_layout,
    place_response_values,
    place_sequence_values,
    response_values,
)
from dapo_jax.train.shaping import overlong_filter, soft_overlong_penalty
from dapo_jax.train.update import TrainFns


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
    use_tis: bool
    pad_id: int
    packing: bool  # trainer.use_sample_packing
    micro_batch_rows: int  # rows of one update micro-batch, all devices
    forward_micro_batch_rows: int  # rows of one log-prob micro-batch, all devices

    @classmethod
    def from_config(cls, cfg: ConfigDict, *, sizes: dict[str, int], pad_id: int
                    ) -> StepSettings:
        t, g, alg = cfg.trainer, cfg.generator, cfg.trainer.algorithm
        return cls(
            group_size=g.n_samples_per_prompt, max_prompt_length=t.max_prompt_length,
            max_generate_length=g.sampling_params.max_generate_length,
            mini_batch_size=sizes["mini_rows"], update_epochs=t.update_epochs_per_batch,
            advantage_estimator=alg.advantage_estimator, grpo_norm_by_std=alg.grpo_norm_by_std,
            overlong_buffer_len=alg.overlong_buffer.len,
            overlong_penalty_factor=alg.overlong_buffer.penalty_factor,
            apply_overlong_filtering=g.apply_overlong_filtering, use_kl_loss=alg.use_kl_loss,
            use_tis=alg.use_tis, pad_id=pad_id, packing=t.use_sample_packing,
            micro_batch_rows=sizes["micro_rows"],
            forward_micro_batch_rows=sizes["forward_micro_rows"])


def shaped_advantages(batch: dict[str, np.ndarray], s: StepSettings
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(shaped rewards, one advantage per response): correctness scores plus the soft
    overlong penalty, then group-relative advantages over each prompt's responses."""
    lengths = np.array([len(r) for r in batch["response_ids"]])
    rewards = batch["score"].astype(np.float32)
    if s.overlong_buffer_len > 0:
        rewards = rewards + np.asarray(soft_overlong_penalty(
            lengths, s.max_generate_length, s.overlong_buffer_len, s.overlong_penalty_factor))
    # Dynamic sampling's groups (replace's copies join their source); else G rows each.
    group_ids = batch.get("group_id", np.arange(len(rewards)) // s.group_size)
    estimator = adv_lib.ADVANTAGE_ESTIMATORS[s.advantage_estimator]
    kwargs = {"norm_by_std": s.grpo_norm_by_std} if s.advantage_estimator == "grpo" else {}
    return rewards, np.asarray(estimator(rewards, group_ids, **kwargs))


@dataclasses.dataclass
class MiniBatch:
    layout: Layout
    tensors: dict[str, np.ndarray]


def mini_batch_rows(batch: dict[str, np.ndarray], advantages: np.ndarray, s: StepSettings
                    ) -> list[MiniBatch]:
    """The update's mini-batches (consecutive `mini_batch_size` sequences, so prompt groups
    stay whole), each laid out in its own padded or packed rows with loss mask (overlong
    filtering applied), advantages and, for TIS, rollout log-probs."""
    n = len(batch["score"])
    if n % s.mini_batch_size:
        raise ValueError(f"rollout batch of {n} sequences does not split into mini-batches of "
                         f"{s.mini_batch_size}")
    out = []
    for lo in range(0, n, s.mini_batch_size):
        part = slice(lo, lo + s.mini_batch_size)
        prompts, responses = list(batch["prompt_ids"][part]), list(batch["response_ids"][part])
        layout = make_layout(prompts, responses, max_prompt_length=s.max_prompt_length,
                             max_response_length=s.max_generate_length, packed=s.packing,
                             micro_batch_rows=s.micro_batch_rows)
        rows = build_rows(layout, prompts, responses, s.pad_id)
        if s.apply_overlong_filtering:
            truncated = place_sequence_values(layout, batch["truncated"][part]) > 0
            rows["loss_mask"] = np.asarray(overlong_filter(rows["loss_mask"], truncated))
        rows["advantages"] = place_sequence_values(layout, advantages[part]) * rows["loss_mask"]
        if s.use_tis:
            rows["rollout_logprobs"] = place_response_values(layout,
                                                             batch["rollout_logprobs"][part])
        out.append(MiniBatch(layout, rows))
    return out


def forward_all(fns: TrainFns, params: Any, minis: list[MiniBatch], s: StepSettings
                ) -> list[np.ndarray]:
    """Log-probs of every mini-batch's rows, recomputed in one forward pass over all of them
    (rows padded to whole forward micro-batches, their number bucketed when packed)."""
    keys = ("input_ids", "segment_ids", "positions")
    rows = {k: np.concatenate([m.tensors[k] for m in minis]) for k in keys}
    total = len(rows["input_ids"])
    padded_total = -(-total // s.forward_micro_batch_rows) * s.forward_micro_batch_rows
    if s.packing:
        padded_total = bucketed_rows(total, s.forward_micro_batch_rows,
                                     at_most=sum(m.layout.num_sequences for m in minis))
    extra = padded_total - total
    rows = {k: np.pad(v, ((0, extra), (0, 0))) for k, v in rows.items()}  # empty rows
    logp = to_host(fns.logprobs(params, rows["input_ids"], rows["segment_ids"],
                                rows["positions"])[0])
    bounds = np.cumsum([0] + [len(m.tensors["input_ids"]) for m in minis])
    return [logp[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def train_step(batch: dict[str, np.ndarray], *, params: Any, opt_state: Any, ref_params: Any,
               fns: TrainFns, settings: StepSettings, timings: dict[str, float]
               ) -> tuple[Any, Any, dict[str, float]]:
    """Shaping, advantages, old log-probs and the mini-batch updates of one step; returns
    the new parameters, optimiser state and the step's metrics."""
    s = settings
    rewards, adv = shaped_advantages(batch, s)
    lengths = np.array([len(r) for r in batch["response_ids"]])
    minis = mini_batch_rows(batch, adv, s)

    start = time.perf_counter()
    for m, old in zip(minis, forward_all(fns, params, minis, s), strict=True):
        m.tensors["old_logprobs"] = old
    if s.use_kl_loss:
        for m, ref in zip(minis, forward_all(fns, ref_params, minis, s), strict=True):
            m.tensors["ref_logprobs"] = ref
    timings["logprobs"] = time.perf_counter() - start
    # Trainer vs sampler log-probs of every response token, read back per sequence.
    old_per_seq = [v for m in minis for v in response_values(m.layout, m.tensors["old_logprobs"])]
    mismatch = np.concatenate([np.abs(np.asarray(r, np.float32) - o) for r, o in
                               zip(batch["rollout_logprobs"], old_per_seq, strict=True)])

    start = time.perf_counter()
    step_metrics: list[dict[str, float]] = []
    for _ in range(s.update_epochs):
        for m in minis:
            params, opt_state, metrics = fns.update(params, opt_state, m.tensors)
            step_metrics.append({k: float(v) for k, v in metrics.items()})
    timings["update"] = time.perf_counter() - start
    for k, v in step_metrics[-1].items():
        if not np.isfinite(v):
            raise FloatingPointError(f"update produced non-finite {k}={v}; stopping before "
                                     "anything is written")
    mean = lambda k: float(np.mean([m[k] for m in step_metrics]))
    rows = sum(len(m.tensors["input_ids"]) for m in minis)
    out: dict[str, float] = {
        "reward/kept_accuracy": float(batch["acc"].mean()),
        "reward/avg_shaped_reward": float(rewards.mean()),
        "generate/avg_response_length": float(lengths.mean()),
        "generate/max_response_length": float(lengths.max()),
        "generate/truncated_frac": float(batch["truncated"].mean()),
        "rollout/logprob_abs_diff": float(mismatch.mean()) if mismatch.size else 0.0,
        "policy/lr": step_metrics[-1]["lr"],
        # Real (prompt + response) tokens over the tokens the update computed on.
        "batch/token_efficiency": float(sum(len(p) for p in batch["prompt_ids"]) +
                                        lengths.sum()) / (rows * minis[0].layout.row_length),
    }
    for key in ("pg_loss", "loss", "grad_norm", "entropy", "approx_kl", "clip_frac_high",
                "clip_frac_low", "dual_clip_frac", "ratio", "kl_loss", "tis_weight"):
        if key in step_metrics[-1]:
            out[f"policy/{key}"] = mean(key)
    return params, opt_state, out
