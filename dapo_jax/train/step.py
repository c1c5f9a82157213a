"""One training step on a kept rollout batch, on the host:

    soft overlong punishment -> advantages -> training tensors -> overlong filtering
    -> old (and reference) log-probs, recomputed -> mini-batch updates -> metrics

`StepSettings` is what the step reads from the config, typed and converted once at the
boundary (`StepSettings.from_config`); everything inside jit lives in `update.py`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from dapo_jax.train import advantages as adv_lib
from dapo_jax.train.batch import pack_sequences, place_response_values
from dapo_jax.train.shaping import overlong_filter, soft_overlong_penalty
from dapo_jax.train.update import TrainFns, mini_batches


@dataclasses.dataclass(frozen=True)
class StepSettings:
    group_size: int  # generator.n_samples_per_prompt
    max_prompt_length: int
    max_generate_length: int
    mini_batch_rows: int  # policy_mini_batch_size x group_size
    update_epochs: int
    advantage_estimator: str  # grpo | rloo
    grpo_norm_by_std: bool
    overlong_buffer_len: int  # 0: no soft overlong punishment
    overlong_penalty_factor: float
    apply_overlong_filtering: bool
    use_kl_loss: bool
    use_tis: bool
    pad_id: int

    @classmethod
    def from_config(cls, cfg: ConfigDict, *, mini_batch_rows: int, pad_id: int
                    ) -> StepSettings:
        t, g, alg = cfg.trainer, cfg.generator, cfg.trainer.algorithm
        return cls(
            group_size=g.n_samples_per_prompt, max_prompt_length=t.max_prompt_length,
            max_generate_length=g.sampling_params.max_generate_length,
            mini_batch_rows=mini_batch_rows, update_epochs=t.update_epochs_per_batch,
            advantage_estimator=alg.advantage_estimator, grpo_norm_by_std=alg.grpo_norm_by_std,
            overlong_buffer_len=alg.overlong_buffer.len,
            overlong_penalty_factor=alg.overlong_buffer.penalty_factor,
            apply_overlong_filtering=g.apply_overlong_filtering, use_kl_loss=alg.use_kl_loss,
            use_tis=alg.use_tis, pad_id=pad_id)


def shaped_advantages(batch: dict[str, np.ndarray], s: StepSettings
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(shaped rewards, one advantage per response): correctness scores plus the soft
    overlong penalty, then group-relative advantages over each prompt's responses."""
    lengths = np.array([len(r) for r in batch["response_ids"]])
    rewards = batch["score"].astype(np.float32)
    if s.overlong_buffer_len > 0:
        rewards = rewards + np.asarray(soft_overlong_penalty(
            lengths, s.max_generate_length, s.overlong_buffer_len, s.overlong_penalty_factor))
    group_ids = np.repeat(np.arange(len(rewards) // s.group_size), s.group_size)
    estimator = adv_lib.ADVANTAGE_ESTIMATORS[s.advantage_estimator]
    kwargs = {"norm_by_std": s.grpo_norm_by_std} if s.advantage_estimator == "grpo" else {}
    return rewards, np.asarray(estimator(rewards, group_ids, **kwargs))


def train_step(batch: dict[str, np.ndarray], *, params: Any, opt_state: Any, ref_params: Any,
               fns: TrainFns, settings: StepSettings, timings: dict[str, float]
               ) -> tuple[Any, Any, dict[str, float]]:
    """Shaping, advantages, old log-probs and the mini-batch updates of one step; returns
    the new parameters, optimiser state and the step's metrics."""
    s = settings
    P, R = s.max_prompt_length, s.max_generate_length
    rewards, adv = shaped_advantages(batch, s)
    lengths = np.array([len(r) for r in batch["response_ids"]])
    tensors = pack_sequences(list(batch["prompt_ids"]), list(batch["response_ids"]), P, R,
                             s.pad_id)
    response_mask = tensors["loss_mask"]
    if s.apply_overlong_filtering:
        tensors["loss_mask"] = np.asarray(overlong_filter(response_mask, batch["truncated"]))
    tensors["advantages"] = np.asarray(adv_lib.token_advantages(adv, tensors["loss_mask"]))

    start = time.perf_counter()
    old, _ = fns.logprobs(params, tensors["input_ids"], tensors["attention_mask"])
    tensors["old_logprobs"] = np.asarray(old)
    if s.use_kl_loss:
        ref, _ = fns.logprobs(ref_params, tensors["input_ids"], tensors["attention_mask"])
        tensors["ref_logprobs"] = np.asarray(ref)
    timings["logprobs"] = time.perf_counter() - start
    rollout_logprobs = place_response_values(batch["rollout_logprobs"], P, R)
    mismatch = np.abs(rollout_logprobs - tensors["old_logprobs"])[response_mask > 0]
    if s.use_tis:
        tensors["rollout_logprobs"] = rollout_logprobs

    start = time.perf_counter()
    step_metrics: list[dict[str, float]] = []
    for mb in mini_batches(tensors, s.mini_batch_rows, epochs=s.update_epochs):
        params, opt_state, m = fns.update(params, opt_state, mb)
        step_metrics.append({k: float(v) for k, v in m.items()})
    timings["update"] = time.perf_counter() - start
    for k, v in step_metrics[-1].items():
        if not np.isfinite(v):
            raise FloatingPointError(f"update produced non-finite {k}={v}; stopping before "
                                     "anything is written")
    mean = lambda k: float(np.mean([m[k] for m in step_metrics]))
    out: dict[str, float] = {
        "reward/kept_accuracy": float(batch["acc"].mean()),
        "reward/avg_shaped_reward": float(rewards.mean()),
        "generate/avg_response_length": float(lengths.mean()),
        "generate/max_response_length": float(lengths.max()),
        "generate/truncated_frac": float(batch["truncated"].mean()),
        "rollout/logprob_abs_diff": float(mismatch.mean()) if mismatch.size else 0.0,
        "policy/lr": step_metrics[-1]["lr"],
    }
    for key in ("pg_loss", "loss", "grad_norm", "entropy", "approx_kl", "clip_frac_high",
                "clip_frac_low", "dual_clip_frac", "ratio", "kl_loss", "tis_weight"):
        if key in step_metrics[-1]:
            out[f"policy/{key}"] = mean(key)
    return params, opt_state, out
