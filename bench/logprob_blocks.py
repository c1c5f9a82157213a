"""Vocabulary block width of the chunked log-probs: sized for the global batch (what the
trainer did before issue 20) vs for one device's rows.

    python bench/logprob_blocks.py [--tokens 1024] [--steps 3]

At the seed shape (Qwen3-1.7B: hidden 2048, vocab 151,936; an update micro-batch of 2 rows
x 10,240 tokens per device, 16 rows over 8 GPUs; 16M-value blocks) the global sizing gives
128-column blocks, 1,187 sequential matmuls per pass, and the per-device sizing 768 columns,
198 matmuls. This times one device's pass with both widths on this CPU, on 2 rows of
`--tokens` tokens (10,240 takes minutes a pass here; the block counts are the seed's).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dapo_jax.models import logprobs

HIDDEN, VOCAB, BLOCK = 2048, 151936, 2**24
SEED_ROWS_PER_DEVICE, SEED_TOKENS, DEVICES = 2, 10240, 8


def seconds(fn, *args, steps: int) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    device_tokens = SEED_ROWS_PER_DEVICE * SEED_TOKENS
    widths = {"global batch": logprobs.vocab_block(device_tokens * DEVICES, VOCAB, BLOCK),
              "per device": logprobs.vocab_block(device_tokens, VOCAB, BLOCK)}
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, a.tokens, HIDDEN)) * 0.02, jnp.float32)
    w = jnp.asarray(rng.normal(size=(HIDDEN, VOCAB)) * 0.02, jnp.float32)
    y = jnp.asarray(rng.integers(0, VOCAB, (2, a.tokens)), jnp.int32)
    print(f"2 rows x {a.tokens} tokens, hidden {HIDDEN}, vocab {VOCAB}, float32, "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| block sized for | columns | blocks | log-prob pass s | forward+backward s |")
    print("|---|---|---|---|---|")
    out = {}
    for name, vc in widths.items():
        fwd = jax.jit(lambda h, w, y, vc=vc: logprobs._logprobs(h, w, y, vc, 1.0))
        loss = lambda h, w, vc=vc: sum(x.sum() for x in logprobs._logprobs(h, w, y, vc, 1.0))
        both = jax.jit(jax.grad(loss, argnums=(0, 1)))
        out[name] = (seconds(fwd, h, w, y, steps=a.steps), seconds(both, h, w, steps=a.steps))
        print(f"| {name} | {vc} | {-(-VOCAB // vc)} | {out[name][0]:.2f} | {out[name][1]:.2f} |",
              flush=True)
    g, d = out["global batch"], out["per device"]
    print(f"per device / global: log-prob pass {g[0] / d[0]:.2f}x faster, forward+backward "
          f"{g[1] / d[1]:.2f}x faster")


if __name__ == "__main__":
    main()
