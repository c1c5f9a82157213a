"""Test setup: 8 simulated CPU devices and tiny random Qwen checkpoints made with transformers.

Nothing is downloaded: models are random and saved to temp dirs.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests in this process compile far more than they run (tiny models, many shapes and
# layouts): XLA:CPU's LLVM optimisation is a third of their time (measured: test_packing,
# test_model, test_generation, test_logprobs 250 s -> 166 s without it). This process only:
# XLA reads the flag when the backend starts, and the end-to-end runs in subprocesses (more
# steps than compiles, twice as slow per step without it) do not inherit it.
_flags = os.environ.get("XLA_FLAGS")
os.environ["XLA_FLAGS"] = f"{_flags or ''} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
jax.devices()  # the backend starts here, with the flag
if _flags is None:
    del os.environ["XLA_FLAGS"]
else:
    os.environ["XLA_FLAGS"] = _flags

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """name -> directory of a saved random HF model, for every variant in hf_models.VARIANTS."""
    root = tmp_path_factory.mktemp("hf")
    return {name: hf_models.save_random(name, root / name) for name in hf_models.VARIANTS}


@pytest.fixture
def rl_batch() -> tuple[np.ndarray, np.ndarray]:
    """8 rows of left-padded prompts + right-padded responses, T=16, vocab 512."""
    return hf_models.rl_batch(batch=8, length=16, vocab=512, seed=0)


# The end-to-end files, heaviest first (seconds on 2 busy cores, the suite's --durations):
# `--dist loadfile` hands out whole files in collection order, so a heavy file collected
# last (test_seed_configs, alphabetically) ran alone on one worker for its last ten minutes
# while the other sat idle. Longest first keeps both busy to the end.
HEAVY_FIRST = ("test_seed_configs.py", "test_trainer.py", "test_multihost.py",
               "test_async.py", "test_launch.py", "test_benchmarks.py", "test_compile.py",
               "test_rollout_sidecar.py", "test_packing.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order
