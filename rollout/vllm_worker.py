"""vLLM worker extension: loads an orbax weight export into the running model in place.

`reload_weights(..., is_checkpoint_format=True)` is the path that works on vLLM's CPU worker
(which repacks weights at start-up, so plain `model.load_weights` fails there) and on GPU.
"""

from __future__ import annotations

import os

# The export reader imports JAX; inside a vLLM worker it must not claim an accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


class ExportLoader:
    model_runner: object  # provided by the vLLM worker this class is mixed into

    def load_export(self, path: str) -> int:
        from dapo_jax.weight_export import ExportIndex, to_torch

        index = ExportIndex(path)
        weights = ((name, to_torch(array)) for name, array in index.items())
        self.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
        return index.version
