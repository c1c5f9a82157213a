"""Custom reward functions for the reward-pool tests (imported by dotted path in workers)."""

import time


def flaky(response: str, ground_truth: str) -> float:
    if response == "hang":
        time.sleep(60)
    if response == "boom":
        raise RuntimeError("reward exploded")
    return 1.0 if response == ground_truth else -1.0
