"""A DAPO-shaped length mix (prompts of tens to hundreds of tokens, long-tailed responses,
some truncated at the generation limit) and how full training rows are under it.

At `scale` 1 it is the CPU benchmark's mix: max_prompt_length 256, max_generate_length
1024; prompts uniform in 20..80 tokens; responses log-normal with median 150 and
P(> 1024) = 5%, those cut at 1024 (truncated). At scale 8 it is the seed runs' shape
(2048 + 8192): prompts 160..640, median response 1,200.
"""

from __future__ import annotations

import numpy as np

from dapo_jax.train.batch import make_layout

SIGMA = np.log(1024 / 150) / 1.645  # log-normal spread with P(response > 1024) = 5%


def length_mix(n: int, rng: np.random.Generator, scale: int = 1
               ) -> tuple[np.ndarray, np.ndarray]:
    """(prompt lengths, response lengths) of n sequences."""
    prompts = rng.integers(20 * scale, 80 * scale + 1, n)
    responses = np.minimum(rng.lognormal(np.log(150 * scale), SIGMA, n).astype(int) + 1,
                           1024 * scale)
    return prompts, responses


def row_efficiency(sequences: int, micro_batch_rows: int, scale: int, seed: int = 0
                   ) -> tuple[float, float]:
    """Useful (non-pad) fraction of the tokens a mini-batch of `sequences` computes on,
    padded and packed (in micro-batches of `micro_batch_rows` rows, bucketed as the trainer
    does), for the mix at `scale`."""
    p_len, r_len = length_mix(sequences, np.random.default_rng(seed), scale)
    row = 1280 * scale
    useful = int((p_len + r_len).sum())
    layout = make_layout([[0] * k for k in p_len], [[0] * k for k in r_len],
                         max_prompt_length=256 * scale, max_response_length=1024 * scale,
                         packed=True, micro_batch_rows=micro_batch_rows)
    return useful / (sequences * row), useful / (layout.num_rows * row)
