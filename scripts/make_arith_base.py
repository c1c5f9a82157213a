"""Builds the embedded base model of the default config: a tiny Qwen3 briefly supervised on the
built-in arithmetic task, so that it sometimes answers right (as a real base model does on
math) and DAPO has something to improve. (Mixing in other answer formats to leave RL a
format to fix was tried: the 2-layer model then lost most of its arithmetic.)
Deterministic; regenerate with

    python scripts/make_arith_base.py [--out dapo_jax/assets/arith_base] [--steps 1000]

Writes an HF checkpoint (config.json, model.safetensors, generation_config.json) and a
character-level tokenizer with a Qwen-style chat template (tokenizer.json,
tokenizer_config.json). Prints greedy and sampled accuracy on held-out problems.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dapo_jax.generation import Generator, SamplingParams  # noqa: E402
from dapo_jax.models import init_model, preset, save_pretrained  # noqa: E402
from dapo_jax.prompts import arithmetic_examples, encode_prompts  # noqa: E402
from dapo_jax.rewards import arithmetic  # noqa: E402
from dapo_jax.train.batch import build_rows, make_layout  # noqa: E402
from dapo_jax.train.update import sequence_logprobs  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="dapo_jax/assets/arith_base")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = preset("qwen3-tiny", vocab_size=128, num_layers=2, hidden_size=128,
                 intermediate_size=384, num_heads=2, num_kv_heads=1, max_position_embeddings=256,
                 eos_token_id=eos, bos_token_id=None)
    model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model)

    train = arithmetic_examples(a.steps * a.batch, seed=0, split="sft")
    prompts = encode_prompts(tok, train)
    responses = [tok.encode(f"Answer: {ex.ground_truth}", add_special_tokens=False) + [eos]
                 for ex in train]
    data = build_rows(make_layout(prompts, responses, max_prompt_length=48,
                                  max_response_length=16, packed=False, micro_batch_rows=1),
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
    for split, seed in (("eval", 0), ("train", 7)):  # held-out, and the RL pool
        problems = arithmetic_examples(256, seed=seed, split=split)
        ids = encode_prompts(tok, problems)
        for name, sp in [("greedy", SamplingParams(temperature=0.0, max_tokens=16)),
                         ("sampled t=1", SamplingParams(temperature=1.0, max_tokens=16, seed=1))]:
            outs = gen.generate(ids, sp)
            acc = np.mean([arithmetic(tok.decode(o[0].token_ids, skip_special_tokens=True),
                                      ex.ground_truth).acc
                           for o, ex in zip(outs, problems, strict=True)])
            print(f"{split} accuracy ({name}): {acc:.3f}")


if __name__ == "__main__":
    main()
