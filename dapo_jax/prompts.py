"""Prompts: datasets in the DAPO-Math-17k / AIME-2024 schema, the built-in arithmetic task,
chat-template tokenisation, and a deterministic, resumable shuffled sampler.

Row schema (parquet or jsonl): `prompt` = [{"role": ..., "content": ...}, ...],
`reward_model` = {"ground_truth": str, ...}, optional `data_source`, `extra_info`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

DAPO_TEMPLATE = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
    "\n\n{problem}\n\nRemember to put your answer on its own line after \"Answer:\".")


@dataclasses.dataclass(frozen=True)
class Example:
    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    ground_truth: str
    data_source: str = ""

    @property
    def key(self) -> str:
        return json.dumps(self.messages)


# ----------------------------------------------------------------------------- loading
class DataError(ValueError):
    """A data file the user has to fix: missing, unreadable, or a bad row (named)."""


def _parse_row(row: dict[str, Any], where: str) -> Example:
    prompt = row.get("prompt")
    if isinstance(prompt, np.ndarray):  # parquet list columns arrive as arrays
        prompt = list(prompt)
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: 'prompt' must be a non-empty list of "
                         f"{{role, content}} messages, got {type(prompt).__name__}")
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: prompt[{i}] must be {{role: system|user|assistant, "
                             f"content: str}}, got {m!r}")
        messages.append((m["role"], m["content"]))
    rm = row.get("reward_model")
    # A parquet struct column gives every row every field: a row without one holds None.
    if not isinstance(rm, dict) or rm.get("ground_truth") is None:
        raise DataError(f"{where}: 'reward_model' must be an object with 'ground_truth'")
    return Example(tuple(messages), str(rm["ground_truth"]), str(row.get("data_source", "")))


def load_examples(path: str | Path) -> tuple[list[Example], int]:
    """Examples from a .parquet or .jsonl file, deduplicated by prompt (first kept).
    Returns (examples, number of duplicates dropped). Bad rows are errors naming the row."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        rows = [(f"{path}, row {i}", row) for i, row in enumerate(table.to_pylist())]
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((f"{path}, line {i}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {i}: malformed JSON: {e}") from None
    else:
        raise DataError(f"dataset {path}: expected a .parquet or .jsonl file")
    seen: set[str] = set()
    examples = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        ex = _parse_row(row, where)
        if ex.key not in seen:
            seen.add(ex.key)
            examples.append(ex)
    return examples, len(rows) - len(examples)


# ----------------------------------------------------------------------------- built-in task
ARITHMETIC_SPLITS = {"eval": (0,), "sft": (1, 2, 3), "train": (4,)}
ARITHMETIC_OPERANDS = (2, 6)  # operands per problem, inclusive


def _operand_bucket(operands: Sequence[int]) -> int:
    # A hash, not a linear form: a sum-like key would tie each split to the answer's residue
    # (a model then never gets another split right).
    return int(hashlib.md5("+".join(map(str, operands)).encode()).hexdigest(), 16) % 5


def arithmetic_examples(count: int, seed: int, split: str = "train") -> list[Example]:
    """Deterministic chain sums `a1 + a2 + ... + ak` of k in `ARITHMETIC_OPERANDS` one-digit
    operands (1-9), k uniform. The expected response works the sum left to right, one line
    per addition with the remaining operands copied (`arithmetic_solution`), and ends on an
    `Answer:` line, so its length grows with k. The splits are disjoint sets of operand
    tuples, by a hash of the tuple: "eval" (1/5) for held-out evaluation, "sft" (3/5) for the
    base model's supervised warm-up, "train" (1/5) for RL, so RL and evaluation both see
    problems the base model never saw.

    The RL and evaluation splits hold distinct problems (a repeated prompt would train as a
    cloned group and count twice in an eval): a drawn tuple already taken is drawn again,
    so once the few short sums of a split are used up (81 tuples of two operands in all,
    about 16 per split) the rest are longer. The supervised split keeps repeats: it is a
    corpus drawn with k uniform, and the shipped base model was trained on exactly it."""
    if split not in ARITHMETIC_SPLITS:
        raise ValueError(f"split must be one of {sorted(ARITHMETIC_SPLITS)}, got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    out: list[Example] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < count:
        operands = [rng.randint(1, 9) for _ in range(rng.randint(*ARITHMETIC_OPERANDS))]
        if split != "sft":
            if tuple(operands) in seen:
                continue
            seen.add(tuple(operands))
        if _operand_bucket(operands) in ARITHMETIC_SPLITS[split]:
            question = "What is " + " + ".join(map(str, operands)) + "?"
            out.append(Example((("user", question),), str(sum(operands)), "arithmetic"))
    return out


def arithmetic_operands(example: Example) -> list[int]:
    """The operands of a built-in arithmetic problem, read back from its question."""
    question = example.messages[-1][1]
    return [int(x) for x in question.removeprefix("What is ").removesuffix("?").split(" + ")]


def arithmetic_solution(operands: Sequence[int]) -> list[str]:
    """The worked lines of a chain sum: each adds the first two terms of the line before
    (the question's terms first) and copies the rest, e.g. 3 + 8 + 5 -> ["11+5", "16"]. The
    response is these lines then `Answer: <sum>`."""
    terms, lines = list(operands), []
    while len(terms) > 1:
        terms = [terms[0] + terms[1], *terms[2:]]
        lines.append("+".join(map(str, terms)))
    return lines


# ----------------------------------------------------------------------------- tokenising
def encode_prompts(tokenizer: Any, examples: Sequence[Example]) -> list[list[int]]:
    """Token ids of each example's chat, rendered with the tokenizer's chat template."""
    return [tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in ex.messages],
                                          add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
            for ex in examples]


@dataclasses.dataclass
class PromptSet:
    """A data set's prompts, chat-rendered and tokenized (`ids[i]` is `examples[i]`'s)."""

    examples: list[Example]
    ids: list[list[int]]
    dropped_overlong: int
    duplicates: int


def load_prompt_set(spec: str, tokenizer: Any, *, split: str, builtin_size: int, seed: int,
                    max_prompt_length: int, on_overlong: str) -> PromptSet:
    """The prompts of a .parquet / .jsonl file (duplicates dropped, counted) or of
    `builtin:arithmetic` (`builtin_size` problems of its `split`), rendered with the
    tokenizer's chat template; prompts over `max_prompt_length` tokens are dropped (counted)
    or, with on_overlong="error", an error."""
    if spec == "builtin:arithmetic":
        examples, dups = arithmetic_examples(builtin_size, seed=seed, split=split), 0
    elif spec.startswith("builtin:"):
        raise DataError(f"{spec}: the built-in task is builtin:arithmetic")
    else:
        examples, dups = load_examples(spec)
    ids = encode_prompts(tokenizer, examples)
    examples, ids, dropped = filter_by_length(examples, ids, max_prompt_length, on_overlong,
                                              spec)
    return PromptSet(examples, ids, dropped, dups)


def filter_by_length(examples: list[Example], ids: list[list[int]], max_prompt_length: int,
                     on_overlong: str, source: str) -> tuple[list[Example], list[list[int]], int]:
    """Drops prompts longer than `max_prompt_length` tokens (counted), or raises."""
    if on_overlong not in ("drop", "error"):
        raise ValueError(f"data.overlong_prompts must be 'drop' or 'error', got {on_overlong!r}")
    keep = [i for i, x in enumerate(ids) if len(x) <= max_prompt_length]
    dropped = len(ids) - len(keep)
    if dropped and on_overlong == "error":
        first = next(i for i, x in enumerate(ids) if len(x) > max_prompt_length)
        raise DataError(f"{source}: prompt {first} has {len(ids[first])} tokens > "
                         f"max_prompt_length {max_prompt_length} ({dropped} such prompts)")
    if not keep:
        raise DataError(f"{source}: no prompt fits max_prompt_length {max_prompt_length}")
    return [examples[i] for i in keep], [ids[i] for i in keep], dropped


# ----------------------------------------------------------------------------- sampling
@dataclasses.dataclass
class SamplerState:
    """Where the shuffled pass over the data stands; goes into checkpoints."""

    epoch: int = 0
    index: int = 0


class PromptSampler:
    """Batches of example indices in a seeded shuffled order, epoch after epoch. The order is
    a pure function of (seed, epoch), so restoring `state` resumes it exactly."""

    def __init__(self, num_examples: int, seed: int, state: SamplerState | None = None):
        self.n = num_examples
        self.seed = seed
        self.state = state or SamplerState()

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_batch(self, size: int) -> list[int]:
        out: list[int] = []
        while len(out) < size:
            order = self._order(self.state.epoch)
            take = order[self.state.index:self.state.index + size - len(out)]
            out.extend(int(i) for i in take)
            self.state.index += len(take)
            if self.state.index >= self.n:
                self.state = SamplerState(self.state.epoch + 1, 0)
        return out
