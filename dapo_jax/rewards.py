"""Rewards for sampled responses, scored in a process pool with a per-sample timeout.

A reward function takes (response text, ground truth) and returns a `RewardResult` (or a
float score, read as correct when > 0). Built in:

- `dapo_math`: DAPO_FACTS section 4. The last 300 characters of the response, the last
  match of `Answer\\s*:\\s*([^\\n]+)` (case-insensitive; none -> "[INVALID]"), Minerva-style
  normalisation of prediction and ground truth, string equality; +1.0 if equal else -1.0.
- `boxed`: the last `\\boxed{...}` compared with math-verify's symbolic `verify`; +1 / -1.
- `arithmetic`: the built-in task: the `Answer:` line must be exactly the integer; +1 / -1.
- anything else: a dotted path `package.module:function` (or `package.module.function`).

A function that raises or runs past `timeout_s` scores as a failure (-1, not correct) and is
counted in the metrics (`reward/errors`, `reward/timeouts`); training goes on.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import multiprocessing
import re
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

FAIL_SCORE = -1.0


@dataclasses.dataclass(frozen=True)
class RewardResult:
    score: float
    acc: bool
    pred: str = ""
    status: str = "ok"  # ok | error | timeout
    traceback: str = ""  # of a raising reward function


class RewardError(RuntimeError):
    """The reward function failed on more than `max_failure_frac` of a batch."""


# ----------------------------------------------------------------------------- DAPO math
_ANSWER = re.compile(r"Answer\s*:\s*([^\n]+)", re.IGNORECASE)
_SUBSTITUTIONS = [("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""),
                  ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","),
                  ("\\text{m}", "\\text{}")]
_UNIT_WORDS = ["square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units",
               "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm",
               "gm", "pounds", "meters", "meals", "edges", "students", "childrentickets",
               "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3",
               "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!",
               "{,}", '"', "\\dots"]


def normalize_answer(answer: str) -> str:
    """Minerva-style normalisation: the text after the last '=', unit words, `$`, `\\text{}`,
    `\\boxed{}`, spaces removed; `\\fracab` -> `\\frac{a}{b}`, `\\sqrta` -> `\\sqrt{a}`;
    thousands commas dropped from pure numbers."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for word in _UNIT_WORDS:
        answer = answer.replace(word, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    for macro in ("text", "textbf", "overline"):
        answer = re.sub(r"(\\" + macro + r"\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def extract_answer(response: str) -> str:
    matches = _ANSWER.findall(response[-300:])
    return matches[-1] if matches else "[INVALID]"


def dapo_math(response: str, ground_truth: str) -> RewardResult:
    pred = normalize_answer(extract_answer(response))
    acc = pred == normalize_answer(ground_truth)
    return RewardResult(1.0 if acc else -1.0, acc, pred)


def arithmetic(response: str, ground_truth: str) -> RewardResult:
    pred = extract_answer(response).strip()
    acc = pred == ground_truth.strip()
    return RewardResult(1.0 if acc else -1.0, acc, pred)


def last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def boxed(response: str, ground_truth: str) -> RewardResult:
    from math_verify import parse, verify

    pred = last_boxed(response)
    if pred is None:
        return RewardResult(-1.0, False, "[INVALID]")
    acc = bool(verify(parse(f"${ground_truth}$"), parse(f"${pred}$")))
    return RewardResult(1.0 if acc else -1.0, acc, pred)


BUILTIN: dict[str, Callable[[str, str], RewardResult]] = {
    "dapo_math": dapo_math, "boxed": boxed, "arithmetic": arithmetic,
}


def resolve(name: str) -> Callable[[str, str], Any]:
    """A built-in reward by name, or a function by dotted path (`pkg.mod:fn` / `pkg.mod.fn`)."""
    if name in BUILTIN:
        return BUILTIN[name]
    module, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if not sep or not module:
        raise ValueError(f"reward {name!r} is neither built in ({sorted(BUILTIN)}) nor a "
                         "dotted path like package.module:function")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {name!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


def _as_result(value: Any) -> RewardResult:
    if isinstance(value, RewardResult):
        return value
    score = float(value)
    return RewardResult(score, score > 0)


# ----------------------------------------------------------------------------- the pool
class _Timeout(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def _score_one(name: str, response: str, ground_truth: str, timeout_s: float) -> RewardResult:
    """Runs in a worker process: the alarm interrupts a function that hangs in Python."""
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return _as_result(resolve(name)(response, ground_truth))
    except _Timeout:
        return RewardResult(FAIL_SCORE, False, "", "timeout")
    except Exception as e:  # a failing reward is a failed sample, counted, not a crash
        return RewardResult(FAIL_SCORE, False, f"{type(e).__name__}: {e}"[:200], "error",
                            traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def failure_counts(results: Sequence[RewardResult]) -> dict[str, float]:
    return {"reward/timeouts": float(sum(r.status == "timeout" for r in results)),
            "reward/errors": float(sum(r.status == "error" for r in results))}


class RewardPool:
    """Scores batches in `workers` spawned processes (never forked from a process running
    JAX). If a worker hangs where the alarm cannot reach (inside C code), the batch deadline
    expires, the pool is replaced and the unfinished samples score as timeouts."""

    def __init__(self, name: str, *, workers: int = 2, timeout_s: float = 10.0,
                 max_failure_frac: float = 1.0):
        resolve(name)  # fail fast on a bad name, in this process
        self.name, self.workers, self.timeout_s = name, workers, timeout_s
        self.max_failure_frac = max_failure_frac
        self._logged: set[str] = set()
        self._pool = self._new_pool()

    def _new_pool(self) -> Any:
        return multiprocessing.get_context("spawn").Pool(self.workers)

    def score(self, responses: Sequence[str], ground_truths: Sequence[str]
              ) -> tuple[list[RewardResult], dict[str, float]]:
        """Every response's result, and timeout/error counts. With several JAX processes each
        scores its contiguous share and all of them get every result (a collective: the
        trainer's thread only)."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} answers")
        from dapo_jax.multihost import split_work  # here: pool workers need no JAX

        results = split_work(lambda part: self.score_here(responses[part], ground_truths[part]),
                             len(responses))
        self.check([r for r in results if r.status != "ok"], len(results))
        return results, failure_counts(results)

    def check(self, failed: Sequence[RewardResult], total: int) -> None:
        """`failed` (errors and timeouts) of a batch of `total` responses: above
        `max_failure_frac` of it, stop with the first one's traceback (a reward that always
        fails makes every group uniform and every advantage 0, a run that trains on
        nothing). Below it, each distinct failure is logged once, with its traceback."""
        if failed and len(failed) > self.max_failure_frac * total:
            first = failed[0]
            raise RewardError(
                f"reward function {self.name} failed on {len(failed)} of {total} "
                f"responses (more than reward.max_failure_frac={self.max_failure_frac}); the "
                f"first failure: {first.status}\n"
                f"{first.traceback or f'timed out after {self.timeout_s} s'}".rstrip())
        for r in failed:
            key = r.pred or r.status
            if key not in self._logged:
                self._logged.add(key)
                log.warning("reward function %s failed (%d of %d this batch; logged once): "
                            "%s\n%s", self.name, len(failed), total, key,
                            r.traceback.rstrip())

    def score_here(self, responses: Sequence[str], ground_truths: Sequence[str]
                   ) -> list[RewardResult]:
        """The results of these responses, scored by this process alone (no exchange with
        other processes, no failure check: `check` the whole batch's results)."""
        pending = [self._pool.apply_async(_score_one, (self.name, r, g, self.timeout_s))
                   for r, g in zip(responses, ground_truths, strict=True)]
        rounds = -(-len(pending) // self.workers)
        deadline = time.monotonic() + (rounds + 1) * (self.timeout_s + 1.0) + 5.0
        results, stuck = [], False
        for p in pending:
            try:
                results.append(p.get(timeout=max(0.0, deadline - time.monotonic())))
            except multiprocessing.TimeoutError:
                results.append(RewardResult(FAIL_SCORE, False, "", "timeout"))
                stuck = True
        if stuck:
            self._pool.terminate()
            self._pool = self._new_pool()
        return results

    def close(self) -> None:
        self._pool.terminate()
