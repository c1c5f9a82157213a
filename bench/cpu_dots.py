"""XLA:CPU against PyTorch on the main job's update matmuls, on this machine's CPU.

The update of the main job (configs/arith_tiny.py) is dot-bound: its FLOPs are fixed by the
work (128 sequences x 120 packed tokens per mini-batch, both frameworks the same), so the
speed of each framework's CPU dots bounds the step. This prints GFLOP/s of the forward
dots, the weight-gradient dots (contraction over the 7,680 tokens of a micro-batch) and a
whole SwiGLU MLP forward + backward, XLA:CPU and torch side by side, and their ratio.

    python bench/cpu_dots.py   # needs torch (the test extra)
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

TOKENS = 64 * 120  # one micro-batch: 64 packed rows of 120 tokens
D, F = 128, 384  # the embedded model's hidden and MLP sizes


def seconds(fn: Callable[..., object], *args: object, reps: int = 30) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def mlp_jax(w1: jax.Array, w2: jax.Array, x: jax.Array) -> jax.Array:
    gate, up = jnp.split(x @ w1, 2, -1)
    return jnp.sum((jax.nn.silu(gate) * up) @ w2)


def mlp_torch(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, up = (x @ w1).chunk(2, -1)
    return ((torch.nn.functional.silu(gate) * up) @ w2).sum()


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for name, (m, k, n), transpose in [
            ("forward x @ W_gate_up", (TOKENS, D, 2 * F), False),
            ("forward h @ W_down", (TOKENS, F, D), False),
            ("weight grad x^T @ dy (gate_up)", (D, TOKENS, 2 * F), True),
            ("weight grad h^T @ dy (down)", (F, TOKENS, D), True)]:
        a = rng.standard_normal((k, m) if transpose else (m, k), np.float32)
        b = rng.standard_normal((k, n), np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        spec = "km,kn->mn" if transpose else "mk,kn->mn"
        dot = jax.jit(lambda x, y, spec=spec: jnp.einsum(spec, x, y))
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tdot = (lambda x, y: x.T @ y) if transpose else (lambda x, y: x @ y)
        rows.append((name, 2 * m * k * n, seconds(dot, ja, jb), seconds(tdot, ta, tb)))

    x = rng.standard_normal((TOKENS, D), np.float32)
    w1 = 0.05 * rng.standard_normal((D, 2 * F), np.float32)
    w2 = 0.05 * rng.standard_normal((F, D), np.float32)
    grad = jax.jit(jax.grad(mlp_jax, argnums=(0, 1)))
    jw1, jw2, jx = map(jnp.asarray, (w1, w2, x))
    tw1, tw2 = (torch.from_numpy(w).requires_grad_() for w in (w1, w2))
    tx = torch.from_numpy(x)
    flops = 3 * 2 * TOKENS * (D * 2 * F + F * D)  # backward = 2x forward
    torch_grad = lambda: torch.autograd.grad(mlp_torch(tw1, tw2, tx), (tw1, tw2))
    rows.append(("SwiGLU MLP forward + backward", flops, seconds(grad, jw1, jw2, jx),
                 seconds(torch_grad)))

    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print("| op | XLA:CPU GFLOP/s | torch GFLOP/s | XLA / torch |")
    print("|---|---|---|---|")
    for name, fl, t_jax, t_torch in rows:
        print(f"| {name} | {fl / t_jax / 1e9:.0f} | {fl / t_torch / 1e9:.0f} | "
              f"{t_torch / t_jax:.2f} |")


if __name__ == "__main__":
    main()
