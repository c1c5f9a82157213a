"""Custom reward functions for the reward-pool tests (imported by dotted path in workers)."""

import time


def flaky(response: str, ground_truth: str) -> float:
    if response == "hang":
        time.sleep(60)
    if response == "boom":
        raise RuntimeError("reward exploded")
    return 1.0 if response == ground_truth else -1.0


def always_raises(response: str, ground_truth: str) -> float:
    raise ValueError(f"cannot parse {ground_truth!r}")


def raises_on_boom(response: str, ground_truth: str) -> float:
    if response == "boom":
        raise KeyError("rare failure")
    return 1.0
