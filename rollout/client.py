"""Trainer-side client of rollout sidecars (`python -m rollout.server`).

- A batch of prompts is split across the sidecar URLs (contiguous chunks, sent in parallel).
- Network errors and 5xx answers are retried with exponential backoff (capped at 10 s) for
  up to `retry_window_s`: long enough for a sidecar that died to be restarted and become
  healthy again (the launcher restarts it).
- Every answer carries the weight version it was generated with. The client refuses any
  other version than the one it pushed last: an older one means the sidecar restarted (or
  missed an update), so the client pushes the current export again and redoes the request;
  a newer one is an error. Nothing is silently generated from stale weights.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rollout import protocol
from rollout.generation import Sample, SamplingParams

log = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    pass


class _Retryable(Exception):
    pass


RETRY_STATUSES = (502, 503, 504)


class RolloutClient:
    def __init__(self, urls: Sequence[str], *, token: str | None = None,
                 timeout_s: float = 600.0, retry_window_s: float = 15.0,
                 backoff_s: float = 1.0):
        if not urls:
            raise ValueError("RolloutClient needs at least one sidecar URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.token = token
        self.timeout_s = timeout_s
        self.retry_window_s = retry_window_s
        self.backoff_s = backoff_s
        self.export_path: str | None = None
        self.version = 0  # sidecars start on the base model: version 0

    # ------------------------------------------------------------------ HTTP
    def _call(self, url: str, method: str, route: str, body: Any = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + route, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                body = json.loads(detail)
                detail = body["error"] + "".join(f"\n  {line}" for line in
                                                 body.get("traceback", []))
            except (ValueError, KeyError, TypeError):
                pass
            if e.code in RETRY_STATUSES:  # a proxy or a sidecar not ready yet: may heal
                raise _Retryable(f"{url}{route}: HTTP {e.code}: {detail}") from None
            # 4xx is our request, 500 the engine failing on it: retrying cannot help.
            raise RolloutError(f"{url}{route}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise _Retryable(f"{url}{route}: {e}") from None

    def _with_retries(self, url: str, fn: Any) -> Any:
        deadline = time.monotonic() + self.retry_window_s
        attempt = 0
        while True:
            try:
                return fn()
            except _Retryable as e:
                wait = min(self.backoff_s * 2 ** attempt, 10.0)
                attempt += 1
                if time.monotonic() + wait > deadline:
                    raise RolloutError(f"sidecar {url} failed {attempt} times in "
                                       f"{self.retry_window_s:.0f} s; last error: {e}") from None
                log.warning("%s; retrying in %.1fs", e, wait)
                time.sleep(wait)

    # ------------------------------------------------------------------ API
    def health(self, url: str) -> dict[str, Any]:
        return self._call(url, "GET", "/health")

    def update_weights(self, path: str, version: int) -> None:
        """Pushes an export to every sidecar; later rollouts must carry `version`."""
        self.export_path, self.version = str(path), int(version)
        for url in self.urls:
            self._with_retries(url, lambda url=url: self._push(url))

    def _push(self, url: str) -> None:
        body = self._call(url, "POST", "/update_weights",
                          {"path": self.export_path, "version": self.version})
        if body["weight_version"] != self.version:
            raise RolloutError(f"{url} reports version {body['weight_version']} after loading "
                               f"version {self.version}")

    def _generate_one(self, url: str, prompts: list[list[int]], sampling: SamplingParams,
                      n: int, keys: list[int], max_tokens: list[int] | None
                      ) -> list[list[Sample]]:
        request = {"prompt_token_ids": prompts, "n": n, "prompt_keys": keys,
                   "sampling_params": dataclasses.asdict(sampling)}
        if max_tokens is not None:
            request["max_tokens"] = max_tokens

        def attempt() -> list[list[Sample]]:
            body = self._call(url, "POST", "/generate", request)
            got = int(body["weight_version"])
            if got < self.version and self.export_path is not None:
                log.warning("%s generated with weight version %d, expected %d (restarted?); "
                            "pushing %s again", url, got, self.version, self.export_path)
                self._push(url)
                raise _Retryable(f"{url} served stale weight version {got}")
            if got != self.version:
                raise RolloutError(f"{url} generated with weight version {got}, expected "
                                   f"{self.version}")
            if len(body["outputs"]) != len(prompts) or any(len(g) != n for g in body["outputs"]):
                raise RolloutError(f"{url} returned {len(body['outputs'])} groups for "
                                   f"{len(prompts)} prompts x n={n}")
            return protocol.decode_outputs(body)

        return self._with_retries(url, attempt)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                 n: int = 1, keys: Sequence[int] | None = None,
                 max_tokens: Sequence[int] | None = None) -> list[list[Sample]]:
        """`n` samples per prompt, split across the sidecars; order follows `prompts`.
        `keys` name the prompts' identities for sampling (`Generator.generate`; default:
        positions in `prompts`), the same whichever sidecar serves a prompt; `max_tokens`
        each prompt's own limit (default: `sampling.max_tokens`)."""
        prompts = [list(p) for p in prompts]
        keys = list(range(len(prompts))) if keys is None else [int(k) for k in keys]
        limits = None if max_tokens is None else [int(m) for m in max_tokens]
        k = len(self.urls)
        size = -(-len(prompts) // k)
        part = lambda xs, i: None if xs is None else xs[i * size:(i + 1) * size]
        chunks = [(url, part(prompts, i), part(keys, i), part(limits, i))
                  for i, url in enumerate(self.urls)]
        chunks = [c for c in chunks if c[1]]
        with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
            parts = pool.map(lambda c: self._generate_one(c[0], c[1], sampling, n, c[2], c[3]),
                             chunks)
            return [group for part in parts for group in part]

