"""Rewards (DAPO math, boxed, arithmetic, custom, the pool) and prompt data handling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dapo_jax.prompts import (
    ARITHMETIC_OPERANDS,
    DataError,
    Example,
    PromptSampler,
    SamplerState,
    arithmetic_examples,
    arithmetic_operands,
    arithmetic_solution,
    filter_by_length,
    load_examples,
)
from dapo_jax.rewards import RewardPool, arithmetic, boxed, dapo_math, normalize_answer, resolve


@pytest.mark.parametrize("pred,truth,ok", [
    ("Answer: 1,000", "1000", True),
    ("Answer: $\\boxed{42}$", "42", True),
    ("so x = 5\nAnswer: x = 5 degrees", "5", True),
    ("Answer: \\frac12", "\\frac{1}{2}", True),
    ("Answer: \\text{(A)}", "(A)", True),
    ("answer : 17\nmore text", "17", True),  # case-insensitive, own line
    ("Answer: 3\nAnswer: 4", "4", True),  # the last match counts
    ("no answer line at all", "4", False),
    ("Answer: 41", "42", False),
])
def test_dapo_math_reward(pred, truth, ok):
    r = dapo_math(pred, truth)
    assert r.acc is ok and r.score == (1.0 if ok else -1.0)


def test_dapo_math_uses_only_the_last_300_characters():
    assert dapo_math("Answer: 7\n" + "x" * 300, "7").pred == "[INVALID]"
    assert normalize_answer("1,234") == "1234" and normalize_answer("\\sqrt2") == "\\sqrt{2}"


def test_boxed_reward_uses_math_verify():
    assert boxed("so \\boxed{\\frac{1}{2}}", "0.5").acc
    assert not boxed("so \\boxed{3}", "4").acc
    assert boxed("no box", "4").pred == "[INVALID]"


def test_arithmetic_reward_and_custom_resolution():
    assert arithmetic("Answer: 77", "77").acc and not arithmetic("Answer: 077", "77").acc
    assert resolve("tests.reward_fixtures:flaky")("a", "a") == 1.0
    assert resolve("tests.reward_fixtures.flaky")("a", "b") == -1.0
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve("tests.reward_fixtures:missing")
    with pytest.raises(ValueError, match="neither built in"):
        resolve("nodots")


def test_reward_pool_counts_hangs_and_errors_and_goes_on():
    pool = RewardPool("tests.reward_fixtures:flaky", workers=2, timeout_s=1.0)
    try:
        results, stats = pool.score(["x", "hang", "boom", "y"], ["x", "z", "z", "z"])
        assert [r.status for r in results] == ["ok", "timeout", "error", "ok"]
        assert [r.score for r in results] == [1.0, -1.0, -1.0, -1.0]
        assert stats == {"reward/timeouts": 1.0, "reward/errors": 1.0}
        assert "reward exploded" in results[2].pred
        again, _ = pool.score(["x"], ["x"])  # still serving
        assert again[0].acc
    finally:
        pool.close()


def test_reward_failures_above_the_bound_stop_with_the_traceback(caplog):
    """All failing: RewardError naming the function, the count and the first traceback.
    Rare failures (1 of 4 under a bound of 0.5): scored -1, counted, logged once each."""
    from dapo_jax.rewards import RewardError

    pool = RewardPool("tests.reward_fixtures:always_raises", workers=1, max_failure_frac=0.01)
    try:
        with pytest.raises(RewardError, match=r"failed on 3 of 3 responses .*"
                           r"reward.max_failure_frac=0.01") as e:
            pool.score(["a", "b", "c"], ["1", "2", "3"])
        assert "ValueError: cannot parse '1'" in str(e.value) and "Traceback" in str(e.value)
        assert 'reward_fixtures.py", line' in str(e.value)
    finally:
        pool.close()
    pool = RewardPool("tests.reward_fixtures:raises_on_boom", workers=1, max_failure_frac=0.5)
    try:
        with caplog.at_level("WARNING", logger="dapo_jax.rewards"):
            for _ in range(2):
                results, stats = pool.score(["boom", "x", "y", "z"], ["1"] * 4)
                assert stats["reward/errors"] == 1.0 and results[0].score == -1.0
        logged = [r for r in caplog.records if "rare failure" in r.getMessage()]
        assert len(logged) == 1 and "Traceback" in logged[0].getMessage()
    finally:
        pool.close()


def _rows():
    row = lambda q, a: {"data_source": "math", "prompt": [{"role": "user", "content": q}],
                        "ability": "MATH", "reward_model": {"ground_truth": a, "style": "rule"},
                        "extra_info": {"index": 0}}
    return [row("1+1?", "2"), row("2+2?", "4"), row("1+1?", "2"), row("3+3?", "6")]


def test_jsonl_and_parquet_load_and_deduplicate(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in _rows()))
    pq.write_table(pa.Table.from_pylist(_rows()), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.parquet"):
        examples, dups = load_examples(tmp_path / name)
        assert dups == 1 and [e.ground_truth for e in examples] == ["2", "4", "6"]
        assert examples[0].messages == (("user", "1+1?"),)


def test_bad_rows_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows()
    rows[2]["reward_model"] = {"style": "rule"}
    # JSONL rows are named by their line (blank lines count), parquet rows by index.
    (tmp_path / "bad.jsonl").write_text("\n\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"bad.jsonl, line 5: 'reward_model'"):
        load_examples(tmp_path / "bad.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet, row 2: 'reward_model'"):
        load_examples(tmp_path / "bad.parquet")
    (tmp_path / "broken.jsonl").write_text('{"prompt": 1}\n{oops\n')
    with pytest.raises(DataError, match="line 2: malformed JSON"):
        load_examples(tmp_path / "broken.jsonl")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match="corrupt.parquet: not a readable parquet file"):
        load_examples(tmp_path / "corrupt.parquet")


def test_overlong_prompts_dropped_and_counted_or_an_error():
    ex = arithmetic_examples(3, seed=0)
    ids = [[1] * 5, [1] * 50, [1] * 7]
    kept, kept_ids, dropped = filter_by_length(ex, ids, 10, "drop", "d")
    assert dropped == 1 and kept_ids == [[1] * 5, [1] * 7] and kept == [ex[0], ex[2]]
    with pytest.raises(ValueError, match="prompt 1 has 50 tokens > max_prompt_length 10"):
        filter_by_length(ex, ids, 10, "error", "d")


def test_sampler_is_deterministic_and_resumable():
    a = PromptSampler(10, seed=3)
    first = [a.next_batch(4) for _ in range(5)]  # crosses epochs
    assert sorted(first[0] + first[1] + first[2][:2]) == list(range(10))
    b = PromptSampler(10, seed=3)
    b.next_batch(4)
    b.next_batch(4)
    resumed = PromptSampler(10, seed=3, state=SamplerState(**vars(b.state)))
    assert [resumed.next_batch(4) for _ in range(3)] == first[2:]


def test_arithmetic_splits_are_disjoint_and_not_tied_to_the_answer():
    split = {s: {e.messages for e in arithmetic_examples(300, 0, s)} for s in
             ("eval", "sft", "train")}
    assert not (split["eval"] & split["sft"]) and not (split["eval"] & split["train"])
    last_digits = {int(e.ground_truth) % 10 for e in arithmetic_examples(300, 0, "eval")}
    assert last_digits == set(range(10))
    assert np.mean([len(e.ground_truth) for e in arithmetic_examples(50, 1)]) > 1


def test_arithmetic_rl_and_eval_splits_hold_distinct_problems():
    """The main job's sizes: 4096 training and 256 held-out problems, none repeated (they
    used to hold 2309 and 208 distinct); the supervised corpus keeps its repeats."""
    for split, count in (("train", 4096), ("eval", 256)):
        examples = arithmetic_examples(count, seed=42, split=split)
        assert len({e.messages for e in examples}) == count, split
    sft = arithmetic_examples(2000, seed=0, split="sft")
    assert len({e.messages for e in sft}) < 2000


def test_arithmetic_task_worked_solution_and_lengths():
    examples = arithmetic_examples(500, seed=3)
    counts = {len(arithmetic_operands(e)) for e in examples}
    assert counts == set(range(ARITHMETIC_OPERANDS[0], ARITHMETIC_OPERANDS[1] + 1))
    ex = Example((("user", "What is 3 + 8 + 5 + 9?"),), "25", "arithmetic")
    assert arithmetic_operands(ex) == [3, 8, 5, 9]
    assert arithmetic_solution([3, 8, 5, 9]) == ["11+5+9", "16+9", "25"]
    for e in examples:
        ops = arithmetic_operands(e)
        assert all(1 <= x <= 9 for x in ops) and str(sum(ops)) == e.ground_truth
        lines = arithmetic_solution(ops)
        assert len(lines) == len(ops) - 1 and lines[-1] == e.ground_truth
        assert arithmetic("\n".join([*lines, f"Answer: {e.ground_truth}"]), e.ground_truth).acc
