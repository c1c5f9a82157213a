"""HTTP rollout sidecar.

    python -m rollout.server --engine {jax,vllm} --model PATH --host 127.0.0.1 --port P \
        --export-root DIR [--token SECRET]

Endpoints and wire format: `rollout/protocol.py`. Loopback by default; with `--token` (or
the ROLLOUT_TOKEN environment variable) every request needs `Authorization: Bearer <token>`.
One request generates at a time; /health answers while it does.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dapo_jax.procs import exit_with_parent
from rollout import protocol
from rollout.protocol import RequestError

MAX_BODY_BYTES = 256 * 2**20
log = logging.getLogger("rollout")


class Sidecar:
    """Routes requests to the engine; transport-free so it is easy to reason about."""

    def __init__(self, engine: Any, export_root: str | Path, token: str | None = None):
        self.engine = engine
        self.export_root = Path(export_root).resolve()
        self.token = token
        self.lock = threading.Lock()
        self.busy = False

    def authorized(self, header: str | None) -> bool:
        if not self.token:
            return True
        return hmac.compare_digest(header or "", f"Bearer {self.token}")

    def health(self) -> dict[str, Any]:
        return {"engine": self.engine.name, "model": self.engine.model,
                "weight_version": self.engine.version, "busy": self.busy,
                "max_model_len": self.engine.max_model_len, "pid": os.getpid(),
                "stop_token_ids": sorted(int(t) for t in self.engine.stop_ids)}

    def generate(self, body: Any) -> dict[str, Any]:
        r = protocol.parse_generate(body, vocab_size=self.engine.vocab_size,
                                    max_model_len=self.engine.max_model_len)
        with self.lock:
            self.busy = True
            try:
                outputs = self.engine.generate(r.prompts, r.sampling, r.n, r.keys, r.max_tokens)
                version = self.engine.version
            finally:
                self.busy = False
        return protocol.encode_outputs(outputs, version)

    def update_weights(self, body: Any) -> dict[str, Any]:
        path_str, version = protocol.parse_update(body)
        path = Path(path_str).resolve()
        if not path.is_relative_to(self.export_root):
            raise RequestError(403, f"path {path_str} is outside --export-root {self.export_root}")
        if not path.is_dir():
            raise RequestError(404, f"no weight export at {path_str}")
        with self.lock:
            self.busy = True
            try:
                self.engine.update_weights(path, version)
            except FileNotFoundError as e:
                raise RequestError(404, str(e)) from None
            finally:
                self.busy = False
        log.info("loaded weights version %d from %s", version, path)
        return {"weight_version": self.engine.version}


def make_handler(sidecar: Sidecar) -> type[BaseHTTPRequestHandler]:
    routes = {("GET", "/health"): lambda _: sidecar.health(),
              ("POST", "/generate"): sidecar.generate,
              ("POST", "/update_weights"): sidecar.update_weights}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            try:
                route = routes.get((method, self.path))
                if route is None:
                    raise RequestError(404, f"no route {method} {self.path}")
                if not sidecar.authorized(self.headers.get("Authorization")):
                    raise RequestError(401, "missing or wrong bearer token")
                body = None
                if method == "POST":
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > MAX_BODY_BYTES:
                        raise RequestError(413, f"body of {length} bytes exceeds "
                                                f"{MAX_BODY_BYTES}")
                    try:
                        body = json.loads(self.rfile.read(length) or b"null")
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise RequestError(400, f"malformed JSON: {e}") from None
                self._reply(200, route(body))
            except RequestError as e:
                self._reply(e.status, {"error": str(e)})
            except Exception as e:  # the server keeps serving; the client sees what failed
                log.exception("request failed")
                tail = traceback.format_exc().strip().splitlines()[-12:]
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR,
                            {"error": f"{type(e).__name__}: {e}", "traceback": tail})

        def do_GET(self) -> None:  # noqa: N802
            self._handle("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._handle("POST")

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug(fmt, *args)

    return Handler


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engine", choices=["jax", "vllm"], required=True)
    p.add_argument("--model", required=True, help="HF model directory (config + safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--export-root", required=True, help="only exports under here are loaded")
    p.add_argument("--token", default=os.environ.get("ROLLOUT_TOKEN"))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--stop-token-ids", default="", help="comma-separated; default: from the "
                                                         "model's generation config/tokenizer")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.2,
                   help="vLLM: fraction of the GPU's memory for weights, activations and KV "
                        "cache (on CPU: of RAM). A JAX engine takes its memory fraction from "
                        "XLA_PYTHON_CLIENT_MEM_FRACTION instead")
    p.add_argument("--max-model-len", type=int, default=0,
                   help="longest prompt + response served (default: the model's positions)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM only")
    a = p.parse_args(argv)
    # The sidecar's own lines at INFO; libraries (orbax logs every restore) at WARNING, so the
    # tail of the log that the launcher quotes on a failure shows what happened.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s rollout %(message)s")
    log.setLevel(logging.INFO)
    exit_with_parent()
    stop_ids = [int(t) for t in a.stop_token_ids.split(",") if t] or None
    if a.engine == "jax":
        from rollout.backends import JaxEngine
        engine = JaxEngine(a.model, dtype=a.dtype, stop_ids=stop_ids,
                           max_model_len=a.max_model_len or None)
    else:
        from rollout.backends import VllmEngine
        engine = VllmEngine(a.model, dtype=a.dtype, stop_ids=stop_ids,
                            gpu_memory_utilization=a.gpu_memory_utilization,
                            max_model_len=a.max_model_len or None,
                            tensor_parallel_size=a.tensor_parallel_size)
    server = ThreadingHTTPServer((a.host, a.port), make_handler(Sidecar(engine, a.export_root,
                                                                        a.token)))
    log.info("serving %s engine for %s on %s:%d (stop token ids %s)", a.engine, a.model,
             a.host, a.port, sorted(int(t) for t in engine.stop_ids))
    server.serve_forever()


if __name__ == "__main__":
    main()
