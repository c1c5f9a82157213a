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
        if index.config().tie_word_embeddings:
            self._reprocess_tied_lm_head()
        return index.version

    def _reprocess_tied_lm_head(self) -> None:
        """A tied lm_head shares the embedding's Parameter, which the reload updated in
        place, but it receives no checkpoint tensor of its own, so the reload does not
        re-run its weight processing. On CPU that processing packs a private GEMM copy of
        the weight, which would keep serving the old head (measured: outputs matched neither
        old nor new weights). Re-running it refreshes the copy; on GPU it is a no-op."""
        lm_head = self.model_runner.get_model().lm_head
        lm_head.quant_method.process_weights_after_loading(lm_head)
