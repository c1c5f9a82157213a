"""Evaluation: the summary against a hand-computed case (pass@k for k < K included), and
`python -m dapo_jax.eval` end to end with its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dapo_jax.evaluation import ks, pass_at_k, summarize
from tests import launching

GROUPS = [  # two prompts from source "a", one from "b"; K = 4 samples each
    {"data_source": "a", "scores": [1, -1, -1, -1], "accs": [1, 0, 0, 0],
     "preds": ["5", "7", "7", "8"]},
    {"data_source": "a", "scores": [1, 1, -1, 1], "accs": [1, 1, 0, 1],
     "preds": ["3", "3", "9", "3"]},
    {"data_source": "b", "scores": [-1, -1, -1, -1], "accs": [0, 0, 0, 0],
     "preds": ["1", "2", "1", "2"]},
]


def test_summary_by_hand():
    s = summarize(GROUPS)
    a, all_ = s["a"], s["all"]
    # accuracy = avg@4: prompt 1 has c = 1 of n = 4, prompt 2 c = 3 -> (1/4 + 3/4) / 2.
    assert a["accuracy"] == a["avg_at_4"] == pytest.approx(0.5)
    assert a["avg_score"] == pytest.approx((-0.5 + 0.5) / 2)
    # pass@1 = c / n; pass@2 = 1 - C(n-c, 2) / C(4, 2): c=1: 1 - 3/6 = 0.5; c=3: 1 - 0 = 1.
    assert a["pass_at_1"] == pytest.approx(0.5)
    assert a["pass_at_2"] == pytest.approx((0.5 + 1.0) / 2)
    assert a["pass_at_4"] == pytest.approx(1.0)
    # maj@4: prompt 1's most common answer is "7" (wrong), prompt 2's "3" (right).
    assert a["maj_at_4"] == pytest.approx(0.5)
    # "b": nothing right; ties in the vote go to the first answer reached ("1", wrong).
    assert s["b"]["pass_at_4"] == 0 and s["b"]["maj_at_4"] == 0
    assert all_["prompts"] == 3 and all_["pass_at_2"] == pytest.approx(1.5 / 3)
    assert all_["accuracy"] == pytest.approx((0.25 + 0.75 + 0) / 3)
    assert "truncated_frac" not in all_  # the groups carry no lengths


def test_summary_lengths_and_truncation():
    groups = [{**g, "lengths": [10 * (i + 1)] * 4, "truncated": [i == 2, False, False, i == 2]}
              for i, g in enumerate(GROUPS)]
    s = summarize(groups)
    assert s["a"]["avg_response_length"] == pytest.approx(15.0)
    assert s["a"]["truncated_frac"] == 0 and s["b"]["truncated_frac"] == pytest.approx(0.5)
    assert s["all"]["avg_response_length"] == pytest.approx(20.0)
    assert s["all"]["truncated_frac"] == pytest.approx(2 / 12)


def test_pass_at_k_estimator():
    assert ks(1) == [1] and ks(4) == [1, 2, 4] and ks(6) == [1, 2, 4, 6]
    # C(8-2, 3) / C(8, 3) = 20 / 56.
    assert pass_at_k(8, 2, 3) == pytest.approx(1 - 20 / 56)
    assert pass_at_k(8, 0, 8) == 0 and pass_at_k(8, 6, 3) == 1


def run_eval(*args):
    return subprocess.run([sys.executable, "-m", "dapo_jax.eval", *map(str, args)],
                          cwd=launching.REPO, env=launching.env(devices=1),
                          capture_output=True, text=True, timeout=600)


def test_eval_cli_on_the_builtin_task(tmp_path):
    out = run_eval("--model", launching.ASSET, "--data", "builtin:arithmetic",
                   "--builtin-size", 12, "--n-samples", 4, "--reward", "arithmetic",
                   "--max-generate-length", 64, "--max-prompt-length", 56, "--batch-prompts",
                   5, "--out", tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert len(samples) == 12 * 4
    acc = sum(s["acc"] for s in samples) / len(samples)
    assert summary["all"]["accuracy"] == pytest.approx(acc) and 0 < acc < 1
    assert set(summary) == {"all", "arithmetic"}
    assert {"pass_at_1", "pass_at_2", "pass_at_4", "maj_at_4", "avg_at_4", "truncated_frac",
            "avg_response_length"} <= set(summary["all"])
    assert summary["all"]["avg_response_length"] == pytest.approx(
        sum(s["response_tokens"] for s in samples) / len(samples))
    assert summary["all"]["truncated_frac"] == pytest.approx(
        sum(s["finish_reason"] == "length" for s in samples) / len(samples))
    assert summary["all"]["pass_at_1"] <= summary["all"]["pass_at_2"] <= \
        summary["all"]["pass_at_4"]
    assert "all: " in out.stdout and "prompts" in out.stderr  # summary and progress bar


def test_eval_cli_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "1+1"}], '
                   '"reward_model": {"ground_truth": "2"}}\n{"prompt": "oops"}\n')
    out = run_eval("--model", launching.ASSET, "--data", bad, "--out", tmp_path / "o")
    assert out.returncode != 0 and "bad.jsonl, line 2" in out.stderr
    out = run_eval("--model", launching.ASSET, "--data", tmp_path / "missing.parquet",
                   "--out", tmp_path / "o")
    assert out.returncode != 0 and "missing.parquet does not exist" in out.stderr
    out = run_eval("--model", tmp_path, "--data", "builtin:arithmetic", "--out", tmp_path / "o")
    assert out.returncode != 0 and "neither a HF directory" in out.stderr
    out = run_eval("--model", launching.ASSET, "--data", "builtin:arithmetic", "--n-samples",
                   0, "--out", tmp_path / "o")
    assert out.returncode != 0 and "--n-samples" in out.stderr
