"""One scored rollout batch (`rollout.worker.rollout`) from a scripted engine: the
keys every sample is drawn with, and which finish reasons overlong filtering drops."""

from __future__ import annotations

import numpy as np

from dapo_jax.prompts import Example, PromptSet
from dapo_jax.rewards import RewardPool
from dapo_jax.train.shaping import overlong_filter
from rollout.generation import Sample, SamplingParams
from rollout.worker import rollout


class ScriptedEngine:
    """Returns one sample per finish reason in `reasons`, in turn; records the keys."""

    def __init__(self, reasons):
        self.reasons, self.keys = reasons, []

    def generate(self, prompts, sampling, n, keys):
        self.keys.append(list(keys))
        it = iter(self.reasons)
        return [[Sample([5, 6], [-0.1, -0.2], next(it), 0) for _ in range(n)] for _ in prompts]


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "Answer: 3"


def test_every_finish_reason_but_stop_is_filtered_and_keys_are_dataset_positions():
    examples = [Example((("user", f"q{i}"),), "3") for i in range(4)]
    prompt_set = PromptSet(examples, [[1, 2]] * 4, 0, 0)  # four copies of one prompt
    engine = ScriptedEngine(["stop", "length", "abort", "stop"])
    batch, _ = rollout(engine, prompt_set, [2, 0], SamplingParams(), 2, Tok(),
                       RewardPool("arithmetic", workers=1), 0, {}, split="collective")
    assert engine.keys == [[2, 0]]  # the prompts' positions in the dataset, not their tokens
    # SkyRL's overlong filtering: "length" and "abort" (any reason but "stop") are masked.
    np.testing.assert_array_equal(batch["truncated"], [False, True, True, False])
    mask = overlong_filter(np.ones((4, 3), np.float32),
                           np.repeat(batch["truncated"][:, None], 3, axis=1))
    np.testing.assert_array_equal(np.asarray(mask).sum(-1), [3, 0, 0, 3])
