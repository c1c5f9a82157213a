"""Builds the embedded base model of the default config: a tiny Qwen3 supervised on worked
solutions of the built-in chain-sum task, imperfect in the ways a real base model is, so that
DAPO has something to improve and each of its components something to act on. The
supervised responses are the worked lines of `arithmetic_solution` then `Answer: <sum>`,
with independent flaws:

- rambling (`--p-ramble`): one worked line repeated 1-4 more times; long problems then
  overrun the generation limit (what overlong filtering and soft punishment act on);
- a wrong step (`--p-wrong`): one line's sum off by 1 or 2, carried on to a wrong answer;
- a format error (`--p-format`): the last line is `So <sum>`, which the reward rejects.

Deterministic; regenerate with

    python scripts/make_arith_base.py [--out dapo_jax/assets/arith_base] [--steps 1000]

Writes an HF checkpoint (config.json, model.safetensors, generation_config.json) and a
character-level tokenizer with a Qwen-style chat template (tokenizer.json,
tokenizer_config.json). Prints held-out accuracy, truncation and format-error rates.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dapo_jax.evaluation import evaluate  # noqa: E402
from dapo_jax.models import init_model, preset, save_pretrained  # noqa: E402
from dapo_jax.prompts import (  # noqa: E402
    Example,
    arithmetic_examples,
    arithmetic_operands,
    arithmetic_solution,
    encode_prompts,
)
from dapo_jax.rewards import RewardPool  # noqa: E402
from dapo_jax.train.batch import build_rows, make_layout  # noqa: E402
from dapo_jax.train.update import sequence_logprobs  # noqa: E402
from rollout.generation import Generator, SamplingParams  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"]
CHARS = string.digits + string.ascii_letters + " \n+-*/=?:.,!'()"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|unk|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


MAX_PROMPT, MAX_RESPONSE, EVAL_TOKENS = 56, 96, 64


def flawed_response(example: Example, rng: random.Random, p_ramble: float, p_wrong: float,
                    p_format: float) -> str:
    """A worked solution with independently drawn flaws (module docstring)."""
    lines = arithmetic_solution(arithmetic_operands(example))
    if rng.random() < p_wrong:  # a slip by delta at one line shifts every later sum by delta
        at, delta = rng.randrange(len(lines)), rng.choice((-2, -1, 1, 2))
        for i in range(at, len(lines)):
            first, *rest = lines[i].split("+")
            lines[i] = "+".join([str(int(first) + delta), *rest])
    answer = lines[-1]
    if rng.random() < p_ramble:
        i = rng.randrange(len(lines))
        lines[i:i + 1] = [lines[i]] * rng.randint(2, 5)
    last = f"So {answer}" if rng.random() < p_format else f"Answer: {answer}"
    return "\n".join([*lines, last])


def report(gen: Generator, tok, rewards: RewardPool, problems: list[Example],
           label: str) -> None:
    ids = encode_prompts(tok, problems)
    for name, sp in [("greedy", SamplingParams(temperature=0.0, max_tokens=EVAL_TOKENS)),
                     ("t=1", SamplingParams(temperature=1.0, max_tokens=EVAL_TOKENS, seed=1))]:
        result = evaluate(gen.generate, ids, problems, sp, 1, tok, rewards)
        m = result.summary["all"]
        no_answer = np.mean(["Answer:" not in x["response"] and x["finish_reason"] != "length"
                             for x in result.samples])
        print(f"{label} {name}: accuracy {m['accuracy']:.3f}, truncated "
              f"{m['truncated_frac']:.3f}, no Answer line {no_answer:.3f}, mean length "
              f"{m['avg_response_length']:.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="dapo_jax/assets/arith_base")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--p-ramble", type=float, default=0.3)
    p.add_argument("--p-wrong", type=float, default=0.2)
    p.add_argument("--p-format", type=float, default=0.3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = preset("qwen3-tiny", vocab_size=128, num_layers=a.layers, hidden_size=128,
                 intermediate_size=384, num_heads=2, num_kv_heads=1, max_position_embeddings=256,
                 eos_token_id=eos, bos_token_id=None)
    model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model)

    train = arithmetic_examples(a.steps * a.batch, seed=0, split="sft")
    prompts = encode_prompts(tok, train)
    rng = random.Random(0)
    responses = []
    for ex in train:  # long rambles are cut: the model also learns not to stop
        text = flawed_response(ex, rng, a.p_ramble, a.p_wrong, a.p_format)
        responses.append((tok.encode(text, add_special_tokens=False) + [eos])[:MAX_RESPONSE])
    data = build_rows(make_layout(prompts, responses, max_prompt_length=MAX_PROMPT,
                                  max_response_length=MAX_RESPONSE, packed=False,
                                  micro_batch_rows=1),
                      prompts, responses, pad)
    opt = optax.adamw(optax.cosine_decay_schedule(a.lr, a.steps), weight_decay=0.0)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss(params):
            logp, _ = sequence_logprobs(nnx.merge(graphdef, params), batch["input_ids"],
                                        batch["segment_ids"], batch["positions"])
            m = batch["loss_mask"]
            return -jnp.sum(logp * m) / jnp.sum(m)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    for i in range(a.steps):
        batch = {k: v[i * a.batch:(i + 1) * a.batch] for k, v in data.items()}
        params, opt_state, loss = step(params, opt_state, batch)
        if i % 50 == 0 or i == a.steps - 1:
            print(f"step {i}: nll {float(loss):.3f}", flush=True)

    model = nnx.merge(graphdef, params)
    save_pretrained(model, out)
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [eos, pad], "pad_token_id": pad}, indent=2) + "\n")

    gen = Generator(graphdef, params, stop_token_ids=[eos, pad], max_model_len=256,
                    pad_token_id=pad)
    rewards = RewardPool("arithmetic")
    report(gen, tok, rewards, arithmetic_examples(256, seed=0, split="eval"), "held-out")
    report(gen, tok, rewards, arithmetic_examples(256, seed=7, split="train"), "RL pool")


if __name__ == "__main__":
    main()
