"""The sidecar's JSON wire format and its validation (a bad request is a RequestError with
an HTTP status and a message that names the problem).

    POST /generate  {"prompt_token_ids": [[int, ...], ...], "n": 4, "prompt_keys": [int, ...],
                     "max_tokens": [int, ...],
                     "sampling_params": {"temperature": 1.0, "top_p": 1.0, "top_k": -1,
                                         "max_tokens": 64, "seed": 0, "ignore_eos": false}}
    (`prompt_keys`, one per prompt: the prompts' identities for sampling; `max_tokens`, one
    per prompt: each prompt's own limit, vLLM's per-request field; both optional)
    -> {"outputs": [[{"token_ids": [...], "logprobs": [...], "finish_reason": "stop"}, ...n],
                    ...one list per prompt],
        "weight_version": 3}
    POST /update_weights {"path": str, "version": int} -> {"weight_version": int}
    GET /health -> {"engine": "jax", "model": "...", "weight_version": 3, "busy": false, ...}
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rollout.generation import Sample, SamplingParams

SAMPLING_FIELDS: dict[str, type] = {
    "temperature": float, "top_p": float, "top_k": int, "max_tokens": int, "seed": int,
    "ignore_eos": bool,
}


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _require_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"{where} must be an integer, got {value!r}")
    return value


def _check_fields(obj: Any, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise RequestError(400, f"{where} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise RequestError(400, f"{where} has unknown field(s) {unknown}; allowed: "
                                f"{sorted(allowed)}")
    missing = sorted(required - set(obj))
    if missing:
        raise RequestError(400, f"{where} is missing field(s) {missing}")


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    prompts: list[list[int]]
    n: int
    sampling: SamplingParams
    keys: list[int]  # each prompt's identity for sampling (default: its position)
    max_tokens: list[int]  # each prompt's limit (default: sampling.max_tokens)


def _int_list(body: dict[str, Any], field: str, count: int) -> list[int] | None:
    if field not in body:
        return None
    values = body[field]
    if not isinstance(values, list) or len(values) != count:
        raise RequestError(400, f"{field} must be a list of {count} integers, one per prompt")
    return [_require_int(v, f"{field}[{i}]") for i, v in enumerate(values)]


def parse_generate(body: Any, *, vocab_size: int, max_model_len: int) -> GenerateRequest:
    _check_fields(body, {"prompt_token_ids", "n", "sampling_params", "prompt_keys",
                         "max_tokens"}, {"prompt_token_ids"}, "request")
    prompts = body["prompt_token_ids"]
    if not isinstance(prompts, list) or not prompts:
        raise RequestError(400, "prompt_token_ids must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if not isinstance(p, list) or not p:
            raise RequestError(400, f"prompt_token_ids[{i}] must be a non-empty list of ints")
        for j, t in enumerate(p):
            _require_int(t, f"prompt_token_ids[{i}][{j}]")
            if not 0 <= t < vocab_size:
                raise RequestError(400, f"prompt_token_ids[{i}][{j}] = {t} is outside the "
                                        f"vocabulary [0, {vocab_size})")
    n = _require_int(body.get("n", 1), "n")
    if n < 1:
        raise RequestError(400, f"n must be >= 1, got {n}")
    raw = body.get("sampling_params", {})
    _check_fields(raw, set(SAMPLING_FIELDS), set(), "sampling_params")
    values = {}
    for key, value in raw.items():
        if SAMPLING_FIELDS[key] is bool:
            if not isinstance(value, bool):
                raise RequestError(400, f"sampling_params.{key} must be true or false, got "
                                        f"{value!r}")
            values[key] = value
        elif SAMPLING_FIELDS[key] is int:
            values[key] = _require_int(value, f"sampling_params.{key}")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError(400, f"sampling_params.{key} must be a number, got {value!r}")
        else:
            values[key] = float(value)
    try:
        sampling = SamplingParams(**values)
    except ValueError as e:
        raise RequestError(400, f"sampling_params: {e}") from None
    limits = _int_list(body, "max_tokens", len(prompts)) or [sampling.max_tokens] * len(prompts)
    for i, (p, limit) in enumerate(zip(prompts, limits, strict=True)):
        if limit < 1:
            raise RequestError(400, f"max_tokens[{i}] must be >= 1, got {limit}")
        if len(p) + limit > max_model_len:
            raise RequestError(400, f"prompt_token_ids[{i}] has {len(p)} tokens; with "
                                    f"max_tokens={limit} that exceeds the model's "
                                    f"maximum length {max_model_len}")
    keys = _int_list(body, "prompt_keys", len(prompts)) or list(range(len(prompts)))
    return GenerateRequest(prompts, n, sampling, keys, limits)


def parse_update(body: Any) -> tuple[str, int]:
    _check_fields(body, {"path", "version"}, {"path", "version"}, "request")
    if not isinstance(body["path"], str):
        raise RequestError(400, f"path must be a string, got {body['path']!r}")
    return body["path"], _require_int(body["version"], "version")


def encode_outputs(outputs: list[list[Sample]], version: int) -> dict[str, Any]:
    return {
        "outputs": [[{k: v for k, v in dataclasses.asdict(s).items() if k != "weight_version"}
                     for s in group] for group in outputs],
        "weight_version": version,
    }


def decode_outputs(body: dict[str, Any]) -> list[list[Sample]]:
    version = int(body["weight_version"])
    return [[Sample(token_ids=s["token_ids"], logprobs=s["logprobs"],
                    finish_reason=s["finish_reason"], weight_version=version) for s in group]
            for group in body["outputs"]]
