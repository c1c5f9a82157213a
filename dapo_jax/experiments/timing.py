"""Timing the real update step on a synthetic DAPO mini-batch (benchmarks, mesh experiments)."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from dapo_jax.models import Precision, init_model
from dapo_jax.models.config import QwenConfig
from dapo_jax.train.update import (
    LossConfig,
    OptimizerConfig,
    init_optimizer,
    make_optimizer,
    make_train_fns,
)

# The seed runs' policy loss (dual clip c = 10, clip-higher 0.2 / 0.28, token mean): what
# every benchmark and mesh experiment times or compiles.
BENCH_LOSS = LossConfig(policy_loss_type="dual_clip", clip_ratio_c=10.0, eps_clip_high=0.28)
BENCH_OPTIMIZER = OptimizerConfig(lr=1e-6, weight_decay=0.1)


def train_flops_per_token(cfg: QwenConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token, what every MFU here divides by (bench/gpu.py, the
    mesh tool): 6 x the matmul parameters (every layer's projections and the LM head; the
    embedding lookup is not a matmul) + 12 L N H T for the attention scores and values, with
    T = `seq_len`, the length each token attends over (a packed row's segments each count
    their own length). Attention is counted whole, as if every token attended all T (PaLM's
    appendix B and verl's count); MaxText counts causal attention as half. For Qwen3-1.7B
    attention is 21% of this count at T = 4,096 and 41% at 10,240: counted half, the model
    FLOPs (and an MFU) come out 11% and 20% lower. Remat's recompute is not model work and
    is not counted; the compile tool's `flops` counts what the program computes."""
    embed_lookup = cfg.vocab_size * cfg.hidden_size if not cfg.tie_word_embeddings else 0
    matmul_params = cfg.num_params - embed_lookup
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params + attention


def synthetic_batch(cfg: QwenConfig, rows: int, seq_len: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """Random tokens; the first quarter is prompt, the rest response with one advantage per
    row and old log-probs near a uniform policy's."""
    rng = np.random.default_rng(seed)
    loss_mask = np.zeros((rows, seq_len), np.float32)
    loss_mask[:, seq_len // 4:] = 1.0
    return {"input_ids": rng.integers(0, cfg.vocab_size, (rows, seq_len)).astype(np.int32),
            "segment_ids": np.ones((rows, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)),
            "loss_mask": loss_mask,
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


def update_seconds(cfg: QwenConfig, batch: dict[str, np.ndarray], steps: int, *,
                   precision: Precision | None = None, remat: str = "none",
                   attention_impl: str = "auto", mesh: jax.sharding.Mesh | None = None
                   ) -> float:
    """`seconds_per_update` of the real DAPO update (BENCH_LOSS, AdamW as BENCH_OPTIMIZER)
    for a randomly initialised model of `cfg` (float32 unless `precision` says otherwise)."""
    graphdef, params = nnx.split(init_model(cfg, seed=0, precision=precision or Precision(),
                                            remat=remat, attention_impl=attention_impl,
                                            mesh=mesh))
    optimizer = make_optimizer(BENCH_OPTIMIZER)
    opt_state = init_optimizer(optimizer, params)
    fns = make_train_fns(graphdef, params, optimizer, BENCH_LOSS, mesh=mesh)
    return seconds_per_update(fns, params, opt_state, batch, steps)
