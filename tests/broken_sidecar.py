"""A real rollout sidecar (`python -m tests.broken_sidecar`, rollout.server's arguments:
`tests.sidecar.start(..., module="tests.broken_sidecar")`) whose JAX engine raises on
every generate request, as a deterministic engine bug does: the trainer must stop at once
with the engine's message instead of retrying. The time of the first request is written to
$BROKEN_SIDECAR_STAMP."""

from __future__ import annotations

import os
import time

from rollout import backends, server


def _broken_generate(self, *args, **kwargs):
    stamp = os.environ.get("BROKEN_SIDECAR_STAMP")
    if stamp and not os.path.exists(stamp):
        with open(stamp, "w") as f:
            f.write(repr(time.time()))
    raise RuntimeError("engine exploded: broken on purpose for the test")


backends.JaxEngine.generate = _broken_generate

if __name__ == "__main__":
    server.main()
