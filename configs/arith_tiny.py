"""The embedded default: DAPO on the built-in arithmetic task from the tiny base checkpoint
shipped in dapo_jax/assets/arith_base (made by scripts/make_arith_base.py). CPU, no downloads,
about 3 minutes on 2 cores;
held-out accuracy (temperature 1) rises from 0.39 to about 0.48.

    python -m dapo_jax.train --config configs/arith_tiny.py
"""

from pathlib import Path

import dapo_jax
from dapo_jax.train.config import default_config


def get_config():
    c = default_config()
    c.model.path = str(Path(dapo_jax.__file__).parent / "assets" / "arith_base")
    c.data.train_data = "builtin:arithmetic"
    c.data.val_data = "builtin:arithmetic"
    c.data.builtin_train_size = 4096
    c.data.builtin_val_size = 256
    c.reward.fn = "arithmetic"

    t = c.trainer
    t.run_dir = "runs/arith_tiny"
    t.max_steps = 150
    t.max_prompt_length = 48
    t.train_batch_size = 32
    t.policy_mini_batch_size = 16
    t.micro_train_batch_size_per_gpu = 64
    t.eval_interval = 25
    t.ckpt_interval = 25
    t.max_ckpts_to_keep = 2
    # Measured: 2e-4 and above knock held-out accuracy down in the first steps (Adam's
    # normalised early steps disturb the supervised weights); 5e-5 rises steadily.
    t.policy.optimizer_config.lr = 5e-5
    t.policy.optimizer_config.weight_decay = 0.0

    a = t.algorithm  # DAPO: clip-higher, dual clip, token-level loss, overlong shaping, filter
    a.policy_loss_type = "dual_clip"
    a.clip_ratio_c = 10.0
    a.eps_clip_low = 0.2
    a.eps_clip_high = 0.28
    a.loss_reduction = "token_mean"
    a.overlong_buffer.len = 4
    a.overlong_buffer.penalty_factor = 1.0
    a.dynamic_sampling.type = "filter"
    a.dynamic_sampling.max_sample_batches = 10

    g = c.generator
    g.n_samples_per_prompt = 8
    g.apply_overlong_filtering = True
    g.sampling_params.max_generate_length = 16
    g.sampling_params.temperature = 1.0
    g.eval_n_samples_per_prompt = 4
    g.eval_sampling_params.max_generate_length = 16
    g.eval_sampling_params.temperature = 1.0
    g.eval_sampling_params.top_p = 1.0  # the policy as trained: top_p < 1 hides its changes
    return c
