"""The JAX generation engine against transformers and against the trainer's log-probs."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from dapo_jax.models import load_pretrained
from dapo_jax.models.qwen import attention
from dapo_jax.models.ragged import (
    KV_BLOCK,
    POOL_ORDERS,
    SlotCache,
    arrange,
    decode_attention,
    pool_orders,
)
from dapo_jax.sharding import make_mesh
from dapo_jax.train.update import sequence_logprobs
from rollout.generation import (
    Generator,
    SamplingParams,
    _argmax,
    _inverse_cdf,
    _truncate,
    batch_sizes,
    bucket,
    sample_tokens,
    sampling_kind,
    stop_token_ids,
)
from tests import hf_models
from tests.compiles import compiles_by_function

STOP = [7, 11]


def prompts(seed=0, count=5):
    rng = np.random.default_rng(seed)
    return [rng.integers(20, 500, size=int(rng.integers(3, 12))).tolist() for _ in range(count)]


def hf_greedy(path, prompt_list, max_new):
    model = hf_models.load_hf(path)
    P = max(len(p) for p in prompt_list)
    ids = np.zeros((len(prompt_list), P), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompt_list):
        ids[i, P - len(p):], mask[i, P - len(p):] = p, 1
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             do_sample=False, max_new_tokens=max_new, eos_token_id=STOP,
                             pad_token_id=0)
    result = []
    for row in out[:, P:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in STOP), len(row))
        result.append(row[:cut])
    return result


@pytest.mark.parametrize("variant", ["qwen3_tied", "qwen2_bias_untied"])
def test_greedy_matches_transformers(tiny_checkpoints, variant):
    path = tiny_checkpoints[variant]
    graphdef, params = nnx.split(load_pretrained(path))
    gen = Generator(graphdef, params, stop_token_ids=STOP, max_model_len=1024)
    ps = prompts()
    out = gen.generate(ps, SamplingParams(temperature=0.0, max_tokens=20))
    ref = hf_greedy(path, ps, 20)
    for got, want in zip(out, ref, strict=True):
        assert got[0].token_ids == want
        assert got[0].finish_reason == ("stop" if want[-1] in STOP else "length")


def test_greedy_on_8_device_mesh_matches_single(tiny_checkpoints):
    path = tiny_checkpoints["qwen3_tied"]
    ps = prompts(1)
    sp = SamplingParams(temperature=0.0, max_tokens=12)
    single = Generator(*nnx.split(load_pretrained(path)), stop_token_ids=STOP, max_model_len=1024)
    mesh = make_mesh((2, 2, 2))
    sharded = Generator(*nnx.split(load_pretrained(path, mesh=mesh)), stop_token_ids=STOP,
                        max_model_len=1024, mesh=mesh)
    a, b = single.generate(ps, sp), sharded.generate(ps, sp)
    assert [s[0].token_ids for s in a] == [s[0].token_ids for s in b]


def test_the_first_fill_moves_no_prompt_kv_between_devices(tiny_checkpoints):
    """The first fill prefills every slot at once and writes row r's keys and values into
    slot r on the device that computed them (`write_prefix(aligned=True)`): the compiled
    cycle's collectives (weight gathers, per-row scalars) do not grow with the prompt
    length. A scatter by slot index gathered every row's prompt KV onto every device (at the
    1.7B seed shape on 8x H100: 62 GB of collectives per call, a 92 GiB peak)."""
    from dapo_jax.experiments.hlo import collective_bytes

    mesh = make_mesh((1, 8, 1))
    graphdef, params = nnx.split(load_pretrained(tiny_checkpoints["qwen3_tied"], mesh=mesh))
    gen = Generator(graphdef, params, stop_token_ids=STOP, max_model_len=512, mesh=mesh,
                    max_num_seqs=16)
    moved = [collective_bytes(gen.lower(params, 16, prompt, 64).compile().as_text())
             for prompt in (64, 128)]
    assert moved[0] == moved[1] > 0, moved


def teacher_forced(graphdef, params, prompt, sample, temperature):
    ids = np.array([prompt + sample.token_ids], np.int32)
    mask = np.ones_like(ids)
    logp, _ = sequence_logprobs(nnx.merge(graphdef, params), ids, mask, temperature=temperature)
    return np.asarray(logp)[0, len(prompt):]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_teacher_forced(tiny_checkpoints, temperature):
    graphdef, params = nnx.split(load_pretrained(tiny_checkpoints["qwen2_bias_untied"]))
    gen = Generator(graphdef, params, stop_token_ids=STOP, max_model_len=1024, weight_version=4)
    ps = prompts(2, count=3)
    out = gen.generate(ps, SamplingParams(temperature=temperature, max_tokens=24, seed=3), n=2)
    assert [len(o) for o in out] == [2, 2, 2]
    for prompt, group in zip(ps, out, strict=True):
        assert group[0].token_ids != group[1].token_ids  # n samples differ
        for s in group:
            assert s.weight_version == 4
            assert len(s.logprobs) == len(s.token_ids)
            np.testing.assert_allclose(s.logprobs, teacher_forced(graphdef, params, prompt, s,
                                                                  temperature), atol=1e-4)


def test_seed_is_deterministic_and_top_k_top_p_restrict(tiny_checkpoints):
    graphdef, params = nnx.split(load_pretrained(tiny_checkpoints["qwen3_tied"]))
    gen = Generator(graphdef, params, stop_token_ids=STOP, max_model_len=1024)
    ps = prompts(3, count=2)
    sp = SamplingParams(temperature=1.0, max_tokens=16, seed=5)
    assert gen.generate(ps, sp, n=3) == gen.generate(ps, sp, n=3)
    # top_k=1 is greedy, with log-prob 0 (all mass on the one kept token).
    top1 = gen.generate(ps, SamplingParams(temperature=1.0, top_k=1, max_tokens=16, seed=9))
    greedy = gen.generate(ps, SamplingParams(temperature=0.0, max_tokens=16))
    for a, b in zip(top1, greedy, strict=True):
        assert a[0].token_ids == b[0].token_ids
        np.testing.assert_allclose(a[0].logprobs, 0.0, atol=1e-6)
    # tiny top_p keeps only the most likely token too.
    nucleus = gen.generate(ps, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=16))
    assert [s[0].token_ids for s in nucleus] == [s[0].token_ids for s in greedy]


def test_compiles_once_per_bucket(tiny_checkpoints):
    """Same buckets, different lengths, counts, limits and sampling settings: after two
    calls nothing compiles again; the decode loop compiles once per batch size at most."""
    graphdef, params = nnx.split(load_pretrained(tiny_checkpoints["qwen3_tied"]))
    gen = Generator(graphdef, params, stop_token_ids=STOP, max_model_len=1024)
    counts = []
    for seed in range(4):  # 5-8 rows: 16 slots; prompts under 16 tokens; limits under 16
        with compiles_by_function() as compiled:
            gen.generate(prompts(seed, count=5 + seed), SamplingParams(
                temperature=0.5 + seed, top_p=0.9 - 0.1 * seed, max_tokens=10 + seed,
                seed=seed), max_tokens=[3 + (seed * i) % 11 for i in range(5 + seed)])
        counts.append(compiled)
    assert counts[0]["jit(_decode)"] > 0 and not counts[2] and not counts[3], counts
    decodes = counts[0]["jit(_decode)"] + counts[1]["jit(_decode)"]
    assert decodes <= len(batch_sizes(16, 1)) * 2  # x the two sampling kinds
    assert bucket(1) == 16 and bucket(17) == 32 and bucket(64) == 64


def test_bad_requests(tiny_checkpoints):
    graphdef, params = nnx.split(load_pretrained(tiny_checkpoints["qwen3_tied"]))
    gen = Generator(graphdef, params, stop_token_ids=STOP, max_model_len=64)
    with pytest.raises(ValueError, match="maximum length 64"):
        gen.generate([[1] * 60], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match="n must be"):
        gen.generate([[1]], SamplingParams(), n=0)
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    jax.clear_caches()


def test_inverse_cdf_draws_follow_the_distribution():
    # 300 tokens (3 blocks of 128), zero-probability tokens in between and at the end.
    p = np.zeros(300)
    p[[0, 5, 130, 131, 299 - 20]] = [0.1, 0.25, 0.3, 0.05, 0.3]
    draws = np.asarray(_inverse_cdf(jax.numpy.tile(jax.numpy.asarray(p, "float32"),
                                                   (40000, 1)),
                                    jax.random.split(jax.random.key(0), 40000)))
    assert set(np.unique(draws)) <= set(np.flatnonzero(p))
    freq = np.bincount(draws, minlength=300) / len(draws)
    np.testing.assert_allclose(freq, p, atol=0.01)


@pytest.mark.parametrize("top_k,top_p", [(-1, 0.7), (5, 1.0), (20, 0.5), (1, 0.9)])
def test_truncate_keeps_the_top_k_then_nucleus(top_k, top_p):
    rng = np.random.default_rng(top_k + 10)
    z = rng.normal(0, 2, (6, 300)).astype(np.float32)
    kept = np.isfinite(np.asarray(_truncate(jax.numpy.asarray(z), top_k, top_p)))
    for row, keep in zip(z, kept, strict=True):
        order = np.argsort(-row.astype(np.float64))
        k = len(row) if top_k < 0 else top_k
        probs = np.exp(row[order[:k]] - row[order[0]])
        probs /= probs.sum()
        # smallest prefix whose mass reaches top_p
        n = int(np.searchsorted(np.cumsum(probs), top_p - 1e-6) + 1)
        assert set(np.flatnonzero(keep)) == set(order[:min(n, k)])


def test_argmax_takes_the_first_of_tied_maxima():
    x = np.random.default_rng(0).normal(size=(5, 300)).astype(np.float32)
    x[1, [7, 40]] = x[2, [0, 299]] = 10.0  # ties: the first index wins, like np.argmax
    np.testing.assert_array_equal(np.asarray(_argmax(jax.numpy.asarray(x))), x.argmax(-1))


def test_decode_attention_reads_each_rows_live_columns():
    """Against float64 softmax attention over [the row's columns < length, its new token],
    rows of unequal lengths (one empty, one filling the cache) in several sorted groups."""
    rng = np.random.default_rng(0)
    L, B, S, N, K, H = 2, 40, 3 * KV_BLOCK, 4, 2, 8
    q = rng.normal(size=(B, N, H))
    k_cache, v_cache = rng.normal(size=(L, B, K, S, H)), rng.normal(size=(L, B, K, S, H))
    k_new, v_new = rng.normal(size=(B, K, H)), rng.normal(size=(B, K, H))
    length = rng.integers(0, S + 1, B)
    length[:2] = 0, S
    f32 = lambda a: jax.numpy.asarray(a, "float32")
    # The pools in each platform's order (the TPU's traced here too: same numbers), and the
    # GPU's Pallas kernel in Pallas's interpreter.
    for k_order, v_order in {pool_orders(), *POOL_ORDERS.values()}:
        cache = SlotCache(arrange(f32(k_cache), k_order, "LBKSH"),
                          arrange(f32(v_cache), v_order, "LBKSH"), jax.numpy.asarray(length))
        kernels = ("xla",) + tuple(f"pallas_{platform}_interpret"
                                   for platform, kernel_orders in POOL_ORDERS.items()
                                   if (k_order, v_order) == kernel_orders)
        for kernel in kernels:
            check_decode_attention(q, k_new, v_new, cache, (k_order, v_order), k_cache,
                                   v_cache, length, kernel)


def check_decode_attention(q, k_new, v_new, cache, orders, k_cache, v_cache, length,
                           kernel="xla"):
    from unittest import mock

    f32 = lambda a: jax.numpy.asarray(a, "float32")
    L, B, K, S, H = k_cache.shape
    N = q.shape[1]
    for layer in range(L):
        with mock.patch("dapo_jax.models.ragged.pool_orders", lambda: orders), \
                mock.patch("dapo_jax.models.ragged.decode_kernel", lambda: kernel):
            out = np.asarray(decode_attention(f32(q), f32(k_new), f32(v_new), cache,
                                              jax.numpy.int32(layer)))
        chex.assert_shape(out, (B, N, H))
        for b, n in np.ndindex(B, N):
            kv = n // (N // K)
            keys = np.concatenate([k_cache[layer, b, kv, :length[b]], k_new[b, kv][None]])
            values = np.concatenate([v_cache[layer, b, kv, :length[b]], v_new[b, kv][None]])
            s = keys @ q[b, n] / np.sqrt(H)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[b, n], p @ values / p.sum(), atol=2e-5)


def test_the_tpu_and_gpu_pool_orders_generate_what_this_cpus_does(tiny_checkpoints):
    """The engine with the TPU's and the GPU's pool orders and Pallas decode kernels
    (interpreted), traced here: the same tokens and log-probs as with
    the CPU's, through prefill writes (the first fill's in place, refills' by slot), column
    writes across a block boundary, refills and shrinking."""
    from unittest import mock

    model = load_pretrained(tiny_checkpoints["qwen3_tied"])
    # Prompts of 100-127 tokens and 12-41 new ones: most rows cross the 128-column block
    # boundary while decoding, in few (interpreted, slow) decode steps.
    prompts = [[(5 + i + 3 * t) % 500 for t in range(100 + (i * 11) % 28)] for i in range(24)]
    sampling = SamplingParams(temperature=1.0, max_tokens=KV_BLOCK, seed=3, ignore_eos=True)
    limits = [12 + (i * 7) % 30 for i in range(24)]
    crossing = [len(p) <= KV_BLOCK < len(p) + n for p, n in zip(prompts, limits, strict=True)]
    assert sum(crossing) > 12

    def run(orders, kernel="xla"):
        gen = Generator(*nnx.split(model), stop_token_ids=[7], max_model_len=512,
                        max_num_seqs=16)
        with contextlib.ExitStack() as stack:
            for where in ("dapo_jax.models.ragged", "dapo_jax.models.qwen",
                          "rollout.generation"):
                stack.enter_context(mock.patch(f"{where}.pool_orders", lambda: orders))
            stack.enter_context(mock.patch("dapo_jax.models.ragged.decode_kernel",
                                           lambda: kernel))
            return gen.generate(prompts, sampling, max_tokens=limits), gen.stats

    cpu, cpu_stats = run(pool_orders())
    tpu, _ = run(POOL_ORDERS["tpu"], kernel="pallas_tpu_interpret")
    gpu, _ = run(POOL_ORDERS["gpu"], kernel="pallas_gpu_interpret")
    assert cpu_stats["inserts"] > 1 and cpu_stats["shrinks"] >= 1
    assert [len(g[0].token_ids) for g in cpu] == limits
    for a, b, c in zip(cpu, tpu, gpu, strict=True):
        assert a[0].token_ids == b[0].token_ids == c[0].token_ids
        np.testing.assert_allclose(a[0].logprobs, b[0].logprobs, atol=1e-5)
        np.testing.assert_allclose(a[0].logprobs, c[0].logprobs, atol=1e-5)


WIDTH = 64  # prompt + response of the replayed sequences, padded: one compilation


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, ids):
    model = nnx.merge(graphdef, params)
    h = model.hidden_states(jax.numpy.maximum(ids, 0), (ids >= 0).astype(np.int32))
    return h @ model.lm_head_weight()


def replay(graphdef, params, prompt, sample, sampling, key, index):
    """(tokens, log-probs) a sequence must get, recomputed without a cache: one
    teacher-forced pass over prompt + sample, each token drawn from its own key (seed,
    prompt key, sample index, token index) as the engine draws it, and its log-prob under
    log_softmax(logits / temperature)."""
    ids = np.full((1, WIDTH), -1, np.int32)
    seq = prompt + sample.token_ids
    ids[0, :len(seq)] = seq
    logits = _logits(graphdef, params, ids)
    logits = logits[0, len(prompt) - 1:len(seq) - 1]
    base = jax.random.key(sampling.seed)
    keys = [jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, key), index), i)
            for i in range(len(sample.token_ids))]
    tokens, _ = sample_tokens(logits, jax.numpy.stack(keys), np.float32(sampling.temperature),
                              np.int32(sampling.top_k), np.float32(sampling.top_p),
                              kind=sampling_kind(sampling))
    logp = jax.nn.log_softmax(logits / sampling.temperature, axis=-1)
    return np.asarray(tokens).tolist(), np.asarray(logp)[np.arange(len(seq) - len(prompt)),
                                                         sample.token_ids]


def test_continuous_batching_refills_slots_and_keeps_each_sequences_tokens(tiny_checkpoints):
    """40 prompts x 2 samples through 12 slots (`max_num_seqs`, not a power of two: the
    pool has 12, not the 16 a bucket would give): slots are refilled mid-call and the batch
    shrinks as the last sequences finish, yet every sequence gets the tokens its own keys
    give (replayed without a cache), the log-probs of the teacher-forced pass, its own
    max_tokens, and stops on a stop token."""
    graphdef, params = nnx.split(load_pretrained(tiny_checkpoints["qwen3_tied"]))
    gen = Generator(graphdef, params, stop_token_ids=STOP, max_model_len=1024, max_num_seqs=12)
    assert gen.shapes(80, 4, 64)[0] == 12
    ps = prompts(4, count=40)
    limits = [int(x) for x in np.random.default_rng(1).integers(1, 40, len(ps))]
    sampling = SamplingParams(temperature=1.0, max_tokens=64, seed=2)
    keys = list(range(100, 140))
    out = gen.generate(ps, sampling, n=2, keys=keys, max_tokens=limits)
    assert gen.stats["inserts"] > 16 and gen.stats["shrinks"] >= 1, gen.stats
    assert gen.stats["utilization"] > 0.5
    finishes = set()
    for prompt, key, limit, group in zip(ps, keys, limits, out, strict=True):
        for j, s in enumerate(group):
            tokens, logprobs = replay(graphdef, params, prompt, s, sampling, key, j)
            assert s.token_ids == tokens
            np.testing.assert_allclose(s.logprobs, logprobs, atol=1e-4)
            assert len(s.token_ids) <= limit
            stopped = s.token_ids[-1] in STOP
            assert s.finish_reason == ("stop" if stopped else "length")
            assert stopped or len(s.token_ids) == limit
            assert all(t not in STOP for t in s.token_ids[:-1])
            finishes.add(s.finish_reason)
    assert finishes == {"stop", "length"}
    # The same sequence alone in a call: the same tokens.
    alone = gen.generate([ps[7]], sampling, n=2, keys=[107], max_tokens=[limits[7]])[0]
    assert [s.token_ids for s in alone] == [s.token_ids for s in out[7]]


def test_per_request_limits_with_stop_tokens_ignored(tiny_checkpoints):
    graphdef, params = nnx.split(load_pretrained(tiny_checkpoints["qwen3_tied"]))
    gen = Generator(graphdef, params, stop_token_ids=list(range(500)), max_model_len=1024)
    limits = [1, 3, 17, 2, 9]
    out = gen.generate(prompts(5), SamplingParams(max_tokens=8, ignore_eos=True),
                       max_tokens=limits)
    assert [len(g[0].token_ids) for g in out] == limits
    assert {g[0].finish_reason for g in out} == {"length"}
    with pytest.raises(ValueError, match=r"max_tokens\[1\] must be an integer >= 1"):
        gen.generate([[1], [2]], SamplingParams(), max_tokens=[3, 0])
    with pytest.raises(ValueError, match="2 max_tokens for 1 prompts"):
        gen.generate([[1]], SamplingParams(), max_tokens=[3, 4])


def test_batch_sizes_shrink_in_steps():
    assert batch_sizes(64, 1) == [64, 48, 32, 24, 16, 8]
    assert batch_sizes(256, 8) == [256, 192, 128, 96, 64, 32, 16, 8]
    assert batch_sizes(8, 1) == [8] and batch_sizes(4, 1) == [4]
    assert batch_sizes(48, 6) == [48, 36, 24, 18, 12]


@pytest.mark.parametrize("causal_max_len", [100, 0], ids=["causal_blocks", "sequential"])
def test_blocked_attention_equals_whole_with_gradients(monkeypatch, causal_max_len):
    """Query blocks (incl. a shorter or padded last block) give the same output and gradients
    on every real query (fully masked left-padding rows are don't-cares)."""
    from dapo_jax.models import qwen

    rng = np.random.default_rng(1)
    B, T, N, K, H = 2, 11, 4, 2, 8
    f32 = lambda a: jax.numpy.asarray(a, "float32")
    q = f32(rng.normal(size=(B, T, N, H)))
    k, v = f32(rng.normal(size=(B, K, H, T))), f32(rng.normal(size=(B, K, T, H)))
    valid = np.ones((B, T), bool)
    valid[0, :3] = False  # left padding
    mask = jax.numpy.asarray(np.tril(np.ones((T, T), bool))[None] & valid[:, None, :])
    w = f32(rng.normal(size=(B, T, N, H)) * valid[:, :, None, None])

    def loss(q, k, v):
        return jax.numpy.sum(w * attention(q, (k, v), mask, causal_max_len=causal_max_len))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    monkeypatch.setattr(qwen, "CAUSAL_BLOCK", 100)  # T <= CAUSAL_BLOCK: one whole block
    whole = grad(q, k, v)
    monkeypatch.setattr(qwen, "CAUSAL_BLOCK", 4)
    monkeypatch.setattr(qwen, "SEQUENTIAL_BLOCK", 4)
    blocked = grad(q, k, v)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(blocked), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


FIXTURES = Path(__file__).parent / "fixtures" / "seed_models"


@pytest.mark.parametrize("model", ["qwen2.5-math-7b", "qwen3-1.7b-base", "qwen3-4b-base"])
def test_seed_models_stop_on_eos_and_end_of_turn(model):
    """The seed's base models name only <|endoftext|> (151643) as eos in config.json,
    generation_config.json and tokenizer_config.json, but prompts go through the chat
    template, whose turns end with <|im_end|> (151645): both stop generation."""
    assert stop_token_ids(FIXTURES / model) == [151643, 151645]


def test_stop_tokens_without_chat_template_and_bad_eos(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    assert stop_token_ids(tmp_path) == [5, 6]
    tok = json.loads((FIXTURES / "qwen3-4b-base" / "tokenizer_config.json").read_text())
    tok["chat_template"] = "{{ messages }}"  # no <|im_end|> turns: only eos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok))
    assert stop_token_ids(tmp_path) == [5, 6, 151643]
    tok["eos_token"] = "<|no_such_token|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="eos_token '<\\|no_such_token\\|>' is not a token"):
        stop_token_ids(tmp_path)
