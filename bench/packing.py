"""Packed vs padded training rows on a DAPO-shaped length mix: useful (non-pad) tokens per
second of the update step and of the old-log-prob pass, and the peak memory of the update,
measured side by side in one run; plus the padding fraction the same mix gives at the seed
runs' shape (2048 + 8192).

    python bench/packing.py [--preset bench-small] [--sequences 128] [--micro-rows 2]
        [--steps 2]

The mix (`dapo_jax.experiments.lengths`), scaled to CPU: max_prompt_length 256,
max_generate_length 1024 (rows of 1280 tokens); prompts uniform in 20..80 tokens; responses
log-normal with median 150 and P(> 1024) = 5%, those cut at 1024 (truncated). At the seed
shape every length is x8.
Both layouts go through the trainer's own code (`train.step.mini_batch_rows`,
the jitted log-prob pass and update) with the same rows per micro-batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dapo_jax.experiments.lengths import length_mix, row_efficiency  # noqa: E402
from dapo_jax.experiments.timing import BENCH_LOSS, BENCH_OPTIMIZER  # noqa: E402
from dapo_jax.models import init_model, preset  # noqa: E402
from dapo_jax.train.step import StepSettings, mini_batch_rows  # noqa: E402
from dapo_jax.train.update import init_optimizer, make_optimizer, make_train_fns  # noqa: E402


def rollout_batch(n: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p_len, r_len = length_mix(n, rng)
    obj = lambda xs: np.array(xs + [None], dtype=object)[:-1]
    return {"prompt_ids": obj([rng.integers(1, vocab, k).tolist() for k in p_len]),
            "response_ids": obj([rng.integers(1, vocab, k).tolist() for k in r_len]),
            "rollout_logprobs": obj([[-5.0] * k for k in r_len]),
            "score": rng.choice([-1.0, 1.0], n).astype(np.float32),
            "acc": np.zeros(n, bool), "truncated": r_len >= 1024}


def measure(cfg, batch, s: StepSettings, steps: int) -> dict[str, float]:
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    optimizer = make_optimizer(BENCH_OPTIMIZER)
    opt_state = init_optimizer(optimizer, params)
    fns = make_train_fns(graphdef, params, optimizer, BENCH_LOSS,
                         micro_batch_rows=s.micro_batch_rows,
                         forward_micro_batch_rows=s.micro_batch_rows)
    n = len(batch["score"])
    (layout,), (mini,) = mini_batch_rows(
        batch, np.where(np.arange(n) % 2, 1.0, -1.0).astype(np.float32), s)
    mini = fns.put(mini)
    forward = lambda: fns.logprobs(params, mini["input_ids"], mini["segment_ids"],
                                   mini["positions"]).block_until_ready()
    forward()  # compile
    start = time.perf_counter()
    for _ in range(steps):
        old = forward()
    forward_s = (time.perf_counter() - start) / steps
    mini["old_logprobs"] = old
    temp = fns.lower_update(params, opt_state, mini).compile().memory_analysis()
    params, opt_state, m = fns.update(params, opt_state, mini)  # compile
    float(m["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, m = fns.update(params, opt_state, mini)
        float(m["loss"])
    update_s = (time.perf_counter() - start) / steps
    useful = sum(len(p) + len(r) for p, r in zip(batch["prompt_ids"], batch["response_ids"],
                                                  strict=True))
    rows = layout.num_rows
    return {"rows": rows, "useful": useful, "efficiency": useful / (rows * layout.row_length),
            "update_tps": useful / update_s, "forward_tps": useful / forward_s,
            "update_temp_gib": temp.temp_size_in_bytes / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-small")
    p.add_argument("--sequences", type=int, default=128, help="sequences per mini-batch")
    p.add_argument("--micro-rows", type=int, default=2, help="rows of 1280 tokens per "
                   "micro-batch (update and forward), as the seed configs' 2 per device")
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    cfg = preset(a.preset)
    batch = rollout_batch(a.sequences, cfg.vocab_size, seed=0)
    base = StepSettings(
        group_size=4, max_prompt_length=256, max_generate_length=1024,
        mini_batch_size=a.sequences, update_epochs=1, advantage_estimator="grpo",
        grpo_norm_by_std=True, overlong_buffer_len=0, overlong_penalty_factor=1.0,
        apply_overlong_filtering=True, use_kl_loss=False, use_tis=False, pad_id=0,
        packing=False, micro_batch_rows=a.micro_rows, shards=1)
    res = {}
    for name, packing in (("padded", False), ("packed", True)):
        res[name] = measure(cfg, batch, dataclasses.replace(base, packing=packing), a.steps)
        print(name, {k: round(v, 3) for k, v in res[name].items()}, flush=True)
    lengths = np.array([len(p) + len(r) for p, r in zip(batch["prompt_ids"],
                                                       batch["response_ids"], strict=True)])
    print(f"\n{a.preset}, {a.sequences} sequences per mini-batch (mean {lengths.mean():.0f} "
          f"tokens, {np.mean(batch['truncated']):.0%} truncated at 1024), rows of 1280, "
          f"{a.micro_rows} rows per micro-batch, float32, CPU")
    print("| layout | rows | useful / computed tokens | update useful tok/s | log-prob pass "
          "useful tok/s | update temporaries GiB |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['rows']} | {r['efficiency']:.2f} | {r['update_tps']:.0f} | "
              f"{r['forward_tps']:.0f} | {r['update_temp_gib']:.2f} |")
    up = res["packed"]["update_tps"] / res["padded"]["update_tps"]
    fw = res["packed"]["forward_tps"] / res["padded"]["forward_tps"]
    print(f"\npacked / padded useful tokens/s: update {up:.2f}x, log-prob pass {fw:.2f}x "
          "(bar: >= 3x)")
    padded, packed = row_efficiency(512, 16, scale=8)  # the seed's 32 x 16 per mini-batch
    print(f"seed shape (2048 + 8192, the same mix x8, 512 sequences, micro-batches of 16 rows):"
          f" useful fraction of computed tokens padded {padded:.2f}, packed {packed:.2f} "
          f"(padding {1 - padded:.0%} -> {1 - packed:.0%})")


if __name__ == "__main__":
    main()
