"""python -m dapo_jax.train --config configs/<name>.py [--config.a.b=value ...]"""

import sys

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from dapo_jax.placement import apply_trainer_memory_fraction, apply_trainer_xla_flags
    from dapo_jax.procs import exit_with_parent
    from dapo_jax.train.config import ConfigError
    from dapo_jax.train.settings import Settings

    exit_with_parent()
    try:  # the one reading of the config: typed settings from here on
        settings = Settings.from_config(_CONFIG.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    apply_trainer_memory_fraction(settings)  # before JAX creates its GPU client
    apply_trainer_xla_flags(settings)
    from dapo_jax.prompts import DataError
    from dapo_jax.rewards import RewardError
    from dapo_jax.train.checkpointing import CheckpointError
    from dapo_jax.train.dynamic_sampling import DynamicSamplingError
    from dapo_jax.train.loop import RunDirInUse, run
    from rollout.client import RolloutError

    try:
        run(settings)
    except (ConfigError, DataError, RunDirInUse, DynamicSamplingError, RolloutError,
            RewardError, CheckpointError) as e:
        # The user's to fix (a key, the run directory, the data, a full disk), or a
        # sidecar's failure with its own message and traceback tail: no trainer traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from dapo_jax.train.config import parse_flags

    app.run(main, flags_parser=parse_flags)
