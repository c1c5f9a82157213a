"""Generation engines behind the sidecar: JAX (dapo_jax's Generator) and vLLM.

Both take prompts as token ids, return `Sample`s with the log-prob of each sampled token under
the processed (temperature-scaled, top-k/top-p truncated) distribution, and load new weights
in place from an orbax export (`dapo_jax.weight_export`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dapo_jax.models import read_config
from rollout.generation import Generator, Sample, SamplingParams, stop_token_ids
from rollout.protocol import RequestError


class JaxEngine:
    name = "jax"

    def __init__(self, model: str, *, dtype: str = "float32", stop_ids: list[int] | None = None,
                 max_model_len: int | None = None):
        from flax import nnx

        from dapo_jax.models import load_pretrained

        self.model = model
        self.dtype = dtype
        loaded = load_pretrained(model, dtype=dtype)
        self.config = loaded.config
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.vocab_size = self.config.vocab_size
        graphdef, params = nnx.split(loaded)
        self.stop_ids = stop_ids or stop_token_ids(model)
        self.generator = Generator(graphdef, params, stop_token_ids=self.stop_ids,
                                   max_model_len=self.max_model_len)

    @property
    def version(self) -> int:
        return self.generator.version

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int,
                 keys: list[int], max_tokens: list[int]) -> list[list[Sample]]:
        return self.generator.generate(prompts, sampling, n, keys, max_tokens)

    def update_weights(self, path: Path, version: int) -> None:
        from flax import nnx

        from dapo_jax.weight_export import load_export

        model, exported = load_export(path, dtype=self.dtype)
        if exported != version:
            raise RequestError(409, f"{path} holds weight version {exported}, not {version}")
        if model.config != self.config:
            raise RequestError(409, f"{path} is a different architecture from the served model")
        self.generator.set_params(nnx.split(model)[1], version)


def request_seed(seed: int, key: int) -> int:
    """A vLLM request's seed from the sampling seed and the prompt's key (well mixed, so
    nearby seeds and keys do not give related streams)."""
    return int(np.random.SeedSequence([seed % 2**32, key % 2**32]).generate_state(1)[0])


class VllmEngine:
    """vLLM's offline engine with a worker extension that reloads weights in place."""

    name = "vllm"

    def __init__(self, model: str, *, dtype: str = "float32", stop_ids: list[int] | None = None,
                 gpu_memory_utilization: float = 0.2, max_model_len: int | None = None,
                 tensor_parallel_size: int = 1):
        from vllm import LLM

        self.model = model
        self.config = read_config(model)
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.vocab_size = self.config.vocab_size
        self.stop_ids = stop_ids or stop_token_ids(model)
        self.version = 0
        from vllm.platforms import current_platform

        # A request whose prompt is prefilled in chunks has its seeded generator rewound
        # after each partial step (`Generator.set_offset`), which torch's CPU generator does
        # not have ("CPU Generator does not use offset": the engine dies as soon as a call's
        # prompts exceed one step's token budget). On CPU every prompt is prefilled whole.
        whole_prefill = dict(enable_chunked_prefill=False,
                             max_num_batched_tokens=max(self.max_model_len, 8192)
                             ) if current_platform.is_cpu() else {}
        self.llm = LLM(
            model=model, dtype=dtype, max_model_len=self.max_model_len, seed=0,
            gpu_memory_utilization=gpu_memory_utilization, skip_tokenizer_init=True,
            tensor_parallel_size=tensor_parallel_size,
            worker_extension_cls="rollout.vllm_worker.ExportLoader",
            logprobs_mode="processed_logprobs", **whole_prefill)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams, n: int,
                 keys: list[int], max_tokens: list[int]) -> list[list[Sample]]:
        """Each request (one prompt, its n samples) is seeded from (seed, the prompt's key):
        copies of one prompt under different keys, and the same sample index of different
        prompts, draw different numbers (one seed for every request made sample j of each
        prompt draw alike), and a prompt gets the same samples whichever batch or sidecar
        it is in. The n samples of a request come from its one seeded generator."""
        from vllm import SamplingParams as VllmSampling

        params = [VllmSampling(
            n=n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=limit, seed=request_seed(sampling.seed, key), logprobs=0,
            # vLLM's ignore_eos spares only the eos; ours spares every stop token.
            stop_token_ids=[] if sampling.ignore_eos else self.stop_ids,
            ignore_eos=sampling.ignore_eos, detokenize=False)
            for key, limit in zip(keys, max_tokens, strict=True)]
        results = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=False)
        out = []
        for result in results:
            group = []
            for c in result.outputs:
                ids = list(c.token_ids)
                logprobs = [float(step[t].logprob) for step, t in zip(c.logprobs, ids,
                                                                       strict=True)]
                group.append(Sample(token_ids=ids, logprobs=logprobs,
                                    finish_reason=c.finish_reason or "abort",
                                    weight_version=self.version))
            out.append(group)
        return out

    def update_weights(self, path: Path, version: int) -> None:
        from dapo_jax.weight_export import read_meta

        exported = read_meta(path)["version"]
        if exported != version:
            raise RequestError(409, f"{path} holds weight version {exported}, not {version}")
        self.llm.collective_rpc("load_export", args=(str(path),))
        self.llm.reset_prefix_cache()
        self.version = version
