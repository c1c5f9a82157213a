"""Peak memory of chunked vs naive per-token log-probs (forward + backward).

Figures come from XLA's memory analysis of the compiled gradient computation (temporaries:
everything live besides the inputs h [B,T,D] and W [D,V]), so lengths that would not fit
this machine can still be measured. Usage:

    python bench/logprob_memory.py [--vocab 151936] [--hidden 2048]
        [--lengths 1024,2048,4096,8192,16384] [--block-elements 16777216]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from dapo_jax.models.logprobs import naive_token_logprobs, token_logprobs


def temp_bytes(fn, B: int, T: int, D: int, V: int, dtype: str, grad: bool) -> int:
    h = jax.ShapeDtypeStruct((B, T, D), dtype)
    w = jax.ShapeDtypeStruct((D, V), dtype)
    y = jax.ShapeDtypeStruct((B, T), jnp.int32)
    def loss(h, w, y):
        logp, entropy = fn(h, w, y)
        return jnp.sum(logp) + jnp.sum(entropy)

    f = jax.grad(loss, argnums=(0, 1)) if grad else fn
    compiled = jax.jit(f).lower(h, w, y).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--block-elements", type=int, default=2**24)
    # XLA:CPU has no bf16 dot and converts all of W to f32 up front; on CPU measure float32.
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = p.parse_args()
    print(f"vocab {a.vocab}, hidden {a.hidden}, batch {a.batch}, block {a.block_elements} logits, "
          f"{a.dtype} h and W, float32 logits; log-prob + entropy; temporaries from XLA's "
          "memory analysis (inputs and outputs excluded)")
    print("| length | pass | naive GiB | chunked GiB | naive / chunked |")
    print("|---|---|---|---|---|")
    chunked_fn = lambda h, w, y: token_logprobs(h, w, y, block_elements=a.block_elements)
    for T in (int(x) for x in a.lengths.split(",")):
        for grad in (False, True):
            shape = (a.batch, T, a.hidden, a.vocab, a.dtype, grad)
            naive = temp_bytes(naive_token_logprobs, *shape)
            chunked = temp_bytes(chunked_fn, *shape)
            print(f"| {T} | {'fwd+bwd' if grad else 'fwd'} | {naive / 2**30:.2f} | "
                  f"{chunked / 2**30:.3f} | {naive / chunked:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
