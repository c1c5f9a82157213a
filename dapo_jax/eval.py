"""Score a model on a data set without training:

    python -m dapo_jax.eval --model <HF dir or <run_dir>/checkpoints/<step>> \\
        --data <file.parquet | file.jsonl | builtin:arithmetic> --n-samples K --out <dir>
        [--temperature 1.0 --top-p 1.0 --top-k -1 --max-generate-length 1024
         --max-prompt-length 2048 --reward dapo_math --sidecar-url URL ...]

Generates K responses per prompt with the JAX engine in this process (or a running rollout
sidecar, `--sidecar-url`, which must serve the same model), scores them, prints the summary
and writes <out>/summary.json (per data_source and overall: avg score, accuracy, avg@K,
pass@k for k = 1, 2, 4, ..., K with the unbiased estimator, maj@K; see
`dapo_jax.evaluation`) and <out>/samples.jsonl (every response). Data files use the
DAPO-Math / AIME schema (README); prompts go through the model's chat template.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm.auto import tqdm

from dapo_jax.evaluation import evaluate
from dapo_jax.prompts import load_prompt_set
from dapo_jax.rewards import RewardPool
from rollout.generation import Generator, SamplingParams, stop_token_ids


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a HF model directory, or a training checkpoint <run_dir>/checkpoints/"
                        "<step> (its run's base model gives the tokenizer)")
    p.add_argument("--data", required=True,
                   help=".parquet / .jsonl (DAPO-Math / AIME schema) or builtin:arithmetic")
    p.add_argument("--n-samples", type=int, default=1, help="responses per prompt (K)")
    p.add_argument("--out", required=True, help="directory for summary.json, samples.jsonl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--max-generate-length", type=int, default=1024)
    p.add_argument("--max-prompt-length", type=int, default=2048,
                   help="longer prompts are dropped (counted) unless --overlong-prompts error")
    p.add_argument("--overlong-prompts", choices=["drop", "error"], default="drop")
    p.add_argument("--reward", default="dapo_math",
                   help="dapo_math | boxed | arithmetic | package.module:function")
    p.add_argument("--reward-workers", type=int, default=2)
    p.add_argument("--reward-timeout-s", type=float, default=10.0)
    p.add_argument("--builtin-size", type=int, default=128, help="builtin:arithmetic prompts")
    p.add_argument("--batch-prompts", type=int, default=64, help="prompts per generate call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="the JAX engine's weights")
    p.add_argument("--sidecar-url", default="", help="generate with this rollout sidecar")
    p.add_argument("--sidecar-token", default="", help="default: ROLLOUT_TOKEN")
    a = p.parse_args(argv)
    if a.n_samples < 1 or a.batch_prompts < 1 or a.builtin_size < 1:
        p.error("--n-samples, --batch-prompts and --builtin-size must be >= 1")
    try:
        a.sampling = SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                    max_tokens=a.max_generate_length, seed=a.seed)
    except ValueError as e:
        p.error(str(e))
    a.error = p.error
    return a


def _model_dirs(model: str) -> tuple[Path, bool]:
    """(directory holding the tokenizer, whether `model` is a training checkpoint)."""
    path = Path(model)
    if (path / "config.json").exists():
        return path, False
    if path.name.isdigit() and path.parent.name == "checkpoints":
        from dapo_jax.train.checkpointing import checkpoint_base_model

        return checkpoint_base_model(path), True
    raise ValueError(f"--model {model}: neither a HF directory (no config.json) nor a "
                     "checkpoint <run_dir>/checkpoints/<step>")


def main(argv: list[str] | None = None) -> None:
    a = _args(argv)
    try:
        tokenizer_dir, is_checkpoint = _model_dirs(a.model)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        prompts = load_prompt_set(a.data, tokenizer, split="eval", builtin_size=a.builtin_size,
                                  seed=a.seed, max_prompt_length=a.max_prompt_length,
                                  on_overlong=a.overlong_prompts)
        examples, ids, dropped = prompts.examples, prompts.ids, prompts.dropped_overlong
    except (ValueError, FileNotFoundError) as e:
        a.error(str(e))
    if a.sidecar_url:
        import os

        from rollout.client import RolloutClient

        generate = RolloutClient([a.sidecar_url], token=a.sidecar_token or
                                 os.environ.get("ROLLOUT_TOKEN") or None).generate
    else:
        from flax import nnx

        if is_checkpoint:
            from dapo_jax.train.checkpointing import checkpoint_model

            model = checkpoint_model(a.model)[0]
        else:
            from dapo_jax.models import load_pretrained

            model = load_pretrained(a.model, dtype=a.dtype)
        graphdef, params = nnx.split(model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        generate = Generator(graphdef, params, stop_token_ids=stop_token_ids(tokenizer_dir),
                             max_model_len=a.max_prompt_length + a.max_generate_length,
                             pad_token_id=pad).generate
    rewards = RewardPool(a.reward, workers=a.reward_workers, timeout_s=a.reward_timeout_s)
    bar = tqdm(total=len(ids), desc="prompts", file=sys.stderr)
    try:
        result = evaluate(generate, ids, examples, a.sampling, a.n_samples, tokenizer, rewards,
                          batch_prompts=a.batch_prompts, progress=bar.update)
    finally:
        bar.close()
        rewards.close()
    result.write(a.out)
    print(f"{len(examples)} prompts x {a.n_samples} samples ({dropped} prompts over "
          f"--max-prompt-length dropped) -> {a.out}")
    for source, metrics in result.summary.items():
        print(f"{source}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
