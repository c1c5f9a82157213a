"""Compile time of the model's forward+backward vs depth (layers are scanned, so it should be
flat). Compiles on abstract parameters (nothing allocated). Usage:

    python bench/compile_time.py [--preset qwen3-0.6b] [--layers 2,16] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dapo_jax.models import Precision, Qwen, preset, token_logprobs


def compile_seconds(cfg, B: int, T: int, remat: str) -> float:
    abstract = nnx.eval_shape(lambda: Qwen(cfg, precision=Precision("bfloat16", "bfloat16"),
                                           remat=remat, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def loss(state, ids, mask):
        model = nnx.merge(graphdef, state)
        logp, _ = token_logprobs(model.hidden_states(ids, mask), model.lm_head_weight(), ids)
        return -jnp.sum(logp * mask)

    ids = jax.ShapeDtypeStruct((B, T), jnp.int32)
    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(state, ids, ids).compile()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen3-0.6b")
    p.add_argument("--layers", default="2,16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--remat", default="full")
    a = p.parse_args()
    rows = []
    for L in (int(x) for x in a.layers.split(",")):
        cfg = dataclasses.replace(preset(a.preset), num_layers=L)
        rows.append((L, compile_seconds(cfg, a.batch, a.seq_len, a.remat)))
    print(f"preset {a.preset}, B={a.batch} T={a.seq_len}, remat={a.remat}, forward+backward")
    print("| layers | compile s | vs first |")
    print("|---|---|---|")
    for L, s in rows:
        print(f"| {L} | {s:.2f} | {s / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
