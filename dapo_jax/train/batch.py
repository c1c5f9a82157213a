"""The training-batch layout: prompt left-padded to P, response right-padded to R.

    input_ids      [N, P + R]   pad | prompt | response | pad
    attention_mask [N, P + R]   1 on prompt and response tokens
    loss_mask      [N, P + R]   1 on response tokens (the ones the policy produced)

Per-token arrays (log-probs, advantages) use the same [N, P + R] positions; a fixed P and R
keep one shape for the whole run, so the update step compiles once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                   max_prompt_length: int, max_response_length: int,
                   pad_id: int = 0) -> dict[str, np.ndarray]:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    P, R = max_prompt_length, max_response_length
    n = len(prompts)
    ids = np.full((n, P + R), pad_id, np.int32)
    attn = np.zeros((n, P + R), np.int32)
    loss = np.zeros((n, P + R), np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not 0 < len(p) <= P:
            raise ValueError(f"row {i}: prompt of {len(p)} tokens does not fit max_prompt_length "
                             f"{P}")
        if len(r) > R:
            raise ValueError(f"row {i}: response of {len(r)} tokens exceeds {R}")
        ids[i, P - len(p):P] = p
        ids[i, P:P + len(r)] = r
        attn[i, P - len(p):P + len(r)] = 1
        loss[i, P:P + len(r)] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def place_response_values(values: Sequence[Sequence[float]], max_prompt_length: int,
                          max_response_length: int) -> np.ndarray:
    """Per-response-token values (e.g. rollout log-probs) at their [N, P + R] positions."""
    out = np.zeros((len(values), max_prompt_length + max_response_length), np.float32)
    for i, v in enumerate(values):
        out[i, max_prompt_length:max_prompt_length + len(v)] = v
    return out
