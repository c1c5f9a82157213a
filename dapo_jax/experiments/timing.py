"""Timing the real update step on a synthetic DAPO mini-batch (benchmarks, mesh experiments)."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from dapo_jax.models.config import QwenConfig


def synthetic_batch(cfg: QwenConfig, rows: int, seq_len: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """Random tokens; the first quarter is prompt, the rest response with one advantage per
    row and old log-probs near a uniform policy's."""
    rng = np.random.default_rng(seed)
    loss_mask = np.zeros((rows, seq_len), np.float32)
    loss_mask[:, seq_len // 4:] = 1.0
    return {"input_ids": rng.integers(0, cfg.vocab_size, (rows, seq_len)).astype(np.int32),
            "attention_mask": np.ones((rows, seq_len), np.int32), "loss_mask": loss_mask,
            "old_logprobs": rng.normal(-np.log(cfg.vocab_size), 0.1,
                                       (rows, seq_len)).astype(np.float32),
            "advantages": (rng.normal(size=(rows, 1)) * loss_mask).astype(np.float32)}


def seconds_per_update(fns: Any, params: Any, opt_state: Any, batch: dict[str, np.ndarray],
                       steps: int) -> float:
    """Mean wall time of `steps` updates after one compiling call."""
    params, opt_state, m = fns.update(params, opt_state, batch)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, m = fns.update(params, opt_state, batch)
    jax.block_until_ready(m)
    return (time.perf_counter() - start) / steps
