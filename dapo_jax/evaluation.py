"""Evaluation: K samples per prompt, scored, summarised. The trainer's periodic eval and
`python -m dapo_jax.eval` both call `evaluate`.

Per data source and overall (every prompt weighs the same), for n = K samples per prompt
of which c are correct:
- avg_score: mean reward (DAPO's +1 / -1 score: 2 x accuracy - 1);
- accuracy = avg@K: mean of c / n;
- pass@k for k = 1, 2, 4, ... up to K (and K itself): the unbiased estimator
  1 - C(n - c, k) / C(n, k) (Chen et al. 2021), the chance that k samples drawn without
  replacement from the n contain a correct one;
- maj@K: the most common extracted answer among the K is correct (ties: the first reached);
- avg_response_length (tokens) and truncated_frac (responses that hit the length limit),
  over all responses, when the groups carry them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dapo_jax.rewards import RewardPool
from rollout.generation import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k), as a running product (no huge binomials)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def ks(n: int) -> list[int]:
    """1, 2, 4, ... < n, and n."""
    out = [1 << i for i in range(n.bit_length()) if 1 << i < n]
    return out + [n]


def summarize(groups: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """`groups`: one per prompt, {"data_source", "scores": [K], "accs": [K], "preds": [K]},
    optionally "lengths": [K] and "truncated": [K]. Returns {source or "all": {metric:
    value}} (see the module docstring)."""
    by_source: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for g in groups:
        by_source[g["data_source"] or "unknown"].append(g)
        by_source["all"].append(g)
    out = {}
    for source, gs in by_source.items():
        n = len(gs[0]["accs"])
        if any(len(g["accs"]) != n for g in gs):
            raise ValueError(f"data source {source!r}: prompts have different sample counts")
        correct = [int(sum(g["accs"])) for g in gs]
        metrics = {"prompts": float(len(gs)),
                   "avg_score": float(np.mean([np.mean(g["scores"]) for g in gs])),
                   "accuracy": float(np.mean([c / n for c in correct]))}
        metrics[f"avg_at_{n}"] = metrics["accuracy"]
        for k in ks(n):
            metrics[f"pass_at_{k}"] = float(np.mean([pass_at_k(n, c, k) for c in correct]))
        metrics[f"maj_at_{n}"] = float(np.mean([_majority_correct(g) for g in gs]))
        if all("lengths" in g for g in gs):
            metrics["avg_response_length"] = float(np.mean([g["lengths"] for g in gs]))
            metrics["truncated_frac"] = float(np.mean([g["truncated"] for g in gs]))
        out[source] = metrics
    return out


def _majority_correct(group: dict[str, Any]) -> bool:
    votes = collections.Counter(group["preds"])
    top = max(votes.values())
    winner = next(p for p in group["preds"] if votes[p] == top)
    return bool(group["accs"][group["preds"].index(winner)])


@dataclasses.dataclass
class EvalResult:
    summary: dict[str, dict[str, float]]
    samples: list[dict[str, Any]]  # one per generated response

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat {eval/<source>/<metric>: value} for a metrics log."""
        return {f"{prefix}/{source}/{k}": v for source, m in self.summary.items()
                for k, v in m.items() if k != "prompts"}

    def write(self, out_dir: str | Path, name: str = "") -> None:
        """<out_dir>/<name>summary.json and <name>samples.jsonl."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")
        with open(out / f"{name}samples.jsonl", "w") as f:
            for row in self.samples:
                f.write(json.dumps(row) + "\n")


def evaluate(generate: Any, prompt_ids: list[list[int]], examples: list[Any],
             sampling: SamplingParams, n_samples: int, tokenizer: Any, rewards: RewardPool,
             *, batch_prompts: int = 0, progress: Any = None) -> EvalResult:
    """`n_samples` responses per prompt from `generate(prompts, sampling, n, keys)` (an
    engine's generate; each prompt keyed by its position in `prompt_ids`), scored by
    `rewards`, summarised. Prompts go `batch_prompts` at a time (0: all at once);
    `progress(n)` is called after each batch with the number of prompts done."""
    groups, samples = [], []
    step = batch_prompts or len(prompt_ids)
    for lo in range(0, len(prompt_ids), step):
        chunk = range(lo, min(lo + step, len(prompt_ids)))
        outs = generate([prompt_ids[i] for i in chunk], sampling, n_samples, list(chunk))
        texts = [[tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in group]
                 for group in outs]
        flat = [t for group in texts for t in group]
        truths = [examples[i].ground_truth for i in chunk for _ in range(n_samples)]
        results, _ = rewards.score(flat, truths)
        for j, i in enumerate(chunk):
            rs = results[j * n_samples:(j + 1) * n_samples]
            ex = examples[i]
            groups.append({"data_source": ex.data_source, "scores": [r.score for r in rs],
                           "accs": [r.acc for r in rs], "preds": [r.pred for r in rs],
                           "lengths": [len(x.token_ids) for x in outs[j]],
                           "truncated": [x.finish_reason == "length" for x in outs[j]]})
            for s, text, r in zip(outs[j], texts[j], rs, strict=True):
                samples.append({"prompt_index": i, "data_source": ex.data_source,
                                "prompt": ex.messages[-1][1], "response": text,
                                "ground_truth": ex.ground_truth, "pred": r.pred,
                                "score": r.score, "acc": r.acc, "status": r.status,
                                "finish_reason": s.finish_reason,
                                "response_tokens": len(s.token_ids)})
        if progress is not None:
            progress(len(chunk))
    return EvalResult(summarize(groups), samples)
