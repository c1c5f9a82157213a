"""The GPU path: MFU of the DAPO update and decode tokens/s against the memory-bandwidth bound,
for a Qwen3-1.7B-shaped model (random init, bf16) on one accelerator.

    python bench/gpu.py [--preset qwen3-1.7b] [--seq-len 4096] [--batch 2] [--steps 5]
        [--attention xla,tokamax] [--decode-batch 64] [--prompt-len 512] [--new-tokens 512]
        [--peak-tflops F] [--hbm-gbps G]

Update: tokens/s of the real jitted update (dual-clip token-mean loss, AdamW, clipping, remat
full, float32 master weights and AdamW state, bf16 compute) on a synthetic mini-batch, once
per attention backend (`model.attention_impl`: xla, tokamax, tokamax_mosaic, ...); MFU =
tokens/s x `train_flops_per_token` / peak bf16 FLOP/s.
Decode: generated tokens/s of the JAX engine (no early stop). Each decode step must read every
weight once and the KV cache up to the current length; the bound is
batch x bandwidth / (weight bytes + mean KV bytes per step), and the table gives the
fraction reached. Peak FLOP/s and bandwidth default from the device kind (H100 SXM: 989
TFLOP/s bf16 dense, 3.35 TB/s; H200: 989, 4.8); pass them for anything else. On CPU it runs
at any size as a smoke test and prints no MFU unless --peak-tflops is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dapo_jax.experiments.timing import (  # noqa: E402
    synthetic_batch,
    train_flops_per_token,
    update_seconds,
)
from dapo_jax.generation import Generator, SamplingParams  # noqa: E402
from dapo_jax.models import Precision, init_model, preset  # noqa: E402

PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}  # bf16 dense FLOP/s, bytes/s


def device_peaks(kind: str) -> tuple[float | None, float | None]:
    for name, peaks in PEAKS.items():
        if name in kind:
            return peaks
    return None, None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="qwen3-1.7b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--attention", default="xla,tokamax",
                   help="comma-separated model.attention_impl values to time the update with")
    p.add_argument("--decode-batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--hbm-gbps", type=float)
    a = p.parse_args()
    device = jax.devices()[0]
    peak_flops, bandwidth = device_peaks(device.device_kind)
    peak_flops = a.peak_tflops * 1e12 if a.peak_tflops else peak_flops
    bandwidth = a.hbm_gbps * 1e9 if a.hbm_gbps else bandwidth
    cfg = preset(a.preset, max_position_embeddings=max(a.seq_len, a.prompt_len + a.new_tokens))
    bf16 = Precision("bfloat16", "bfloat16")
    print(f"device {device.device_kind}, preset {a.preset} ({cfg.num_params / 1e6:.0f}M params)",
          flush=True)

    updates = []  # (attention, ms per step, tok/s, MFU)
    for impl in a.attention.split(","):
        step_s = update_seconds(cfg, synthetic_batch(cfg, a.batch, a.seq_len), a.steps,
                                precision=Precision("float32", "bfloat16"), remat="full",
                                attention_impl=impl)
        train_tps = a.batch * a.seq_len / step_s
        achieved = train_tps * train_flops_per_token(cfg, a.seq_len)
        mfu = f"{achieved / peak_flops:.1%}" if peak_flops else "n/a"
        updates.append((impl, step_s, train_tps, mfu))
        print(f"update ({impl} attention): {step_s * 1e3:.0f} ms/step, {train_tps:.0f} tok/s, "
              f"{achieved / 1e12:.1f} model TFLOP/s, MFU {mfu}", flush=True)

    # Decode, on a fresh bf16 copy of the same init.
    graphdef, params = nnx.split(init_model(cfg, seed=0, precision=bf16))
    gen = Generator(graphdef, params, stop_token_ids=[cfg.vocab_size - 1],
                    max_model_len=cfg.max_position_embeddings)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size - 1, (a.decode_batch, a.prompt_len)).tolist()
    sampling = SamplingParams(temperature=1.0, max_tokens=a.new_tokens, seed=0)
    gen.generate(prompts, sampling)  # compile
    start = time.perf_counter()
    out = gen.generate(prompts, sampling)
    decode_s = time.perf_counter() - start
    new = sum(len(s.token_ids) for g in out for s in g)
    decode_tps = new / decode_s
    weight_bytes = cfg.num_params * 2
    # What a step must read: every weight, and the cache up to the current length (mean over
    # the steps; the engine itself reads all prompt + new-token-bucket slots every step).
    slots = a.prompt_len + a.new_tokens / 2
    kv_bytes = int(2 * cfg.num_layers * a.decode_batch * cfg.num_kv_heads * cfg.head_dim
                   * slots * 2)
    if bandwidth:
        bound = a.decode_batch * bandwidth / (weight_bytes + kv_bytes)
        vs_bound = f"bound {bound:.0f} tok/s, {decode_tps / bound:.1%} of it"
    else:
        vs_bound = "bound n/a (pass --hbm-gbps)"
    print(f"decode: batch {a.decode_batch}, {new} tokens in {decode_s:.2f} s (incl. prefill "
          f"of {a.prompt_len}): {decode_tps:.0f} tok/s; weights {weight_bytes / 2**30:.2f} GiB "
          f"+ KV {kv_bytes / 2**30:.2f} GiB per step; {vs_bound}", flush=True)

    print("\n| device | preset, attention | update ms | update tok/s | MFU | decode batch | "
          "decode tok/s | bandwidth bound tok/s |\n|---|---|---|---|---|---|---|---|")
    for impl, step_s, train_tps, mfu in updates:
        print(f"| {device.device_kind} | {a.preset} T={a.seq_len} B={a.batch}, {impl} | "
              f"{step_s * 1e3:.0f} | {train_tps:.0f} | {mfu} | {a.decode_batch} | "
              f"{decode_tps:.0f} | {f'{bound:.0f}' if bandwidth else 'n/a'} |")


if __name__ == "__main__":
    main()
