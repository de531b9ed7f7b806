"""Writes a random-weight Qwen2-architecture model with Qwen2.5's vocabulary size (151936), the
real-vocabulary testbed of issue 18: nothing is downloaded, every file comes from a seed.

- Tokenizer: Qwen2's pipeline exactly (NFC, Qwen's split regex, byte-level BPE, the class
  ``Qwen2Tokenizer``, so transformers 5 and TRL load it as they load Qwen2.5's). Its BPE
  vocabulary: the 256 bytes, merges learned on the arithmetic task's texts (R1 system prompt,
  questions, gold responses; a few thousand, so prompts compress as a real tokenizer's do), then
  generated merges (a seeded random earlier token + one printable byte) until, with the three
  specials at the end (``<|endoftext|>`` pad, ``<|im_start|>``, ``<|im_end|>`` EOS), every id
  of the embedding has its own token: ``len(tokenizer) == vocab_size``. Any text encodes (byte
  level); the chat template is the bundled model's (Qwen style, R1 system prompt by default).
- Model: ``Qwen2ForCausalLM``, hidden 512, 4 layers, 8 heads of 64, 2 KV heads, intermediate
  1408, tied embeddings, fp32, transformers' own initialization from ``torch.manual_seed``
  (~89.5M parameters, 358 MB; 87 % of them the embedding). Untrained: its samples are noise and
  rarely end before the length cap, which is what a cost benchmark wants.

Byte-reproducible from ``--seed`` (same transformers / tokenizers / torch versions)::

    python scripts/make_vocab_model.py                          # outputs/vocab-model-151936
    python scripts/make_vocab_model.py --out /tmp/a
    python scripts/make_vocab_model.py --out /tmp/b
    for f in /tmp/a/*; do cmp "$f" /tmp/b/$(basename "$f"); done
    python bench/bench_e2e.py --model outputs/vocab-model-151936 ...

``--vocab-size/--hidden/--layers/...`` build small variants the same way (tests use them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, save_atomically

from icpo.data.templates import R1_SYSTEM_PROMPT
from icpo.tasks.arithmetic import gold_response, iter_expressions, question

PAD, IM_START, EOS = SPECIAL_TOKENS  # "<|endoftext|>", "<|im_start|>", "<|im_end|>"
LEARNED_VOCAB = 4096
"""Byte-level BPE tokens learned on the task's texts (at most; fewer for small variants)."""
_BYTE_CHARS: list[str] = []  # byte -> its printable stand-in in byte-level BPE (GPT-2's map)


def byte_chars() -> list[str]:
    """GPT-2 / Qwen byte-level alphabet: the character each byte is written as in the vocab."""
    if not _BYTE_CHARS:
        keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                *range(ord("®"), ord("ÿ") + 1)]
        extra = iter(range(256, 512))
        _BYTE_CHARS.extend(chr(b) if b in keep else chr(next(extra)) for b in range(256))
    return _BYTE_CHARS


def task_texts(num: int) -> list[str]:
    """The texts prompts and responses are made of, split where the chat template puts special
    tokens (BPE never merges across them)."""
    texts = []
    exprs = iter_expressions("train", seed=1)
    for _ in range(num):
        expr = next(exprs)
        texts += ["system\n" + R1_SYSTEM_PROMPT, "\n", "user\n" + question(expr), "\n",
                  "assistant\n" + gold_response(expr)]
    return texts


def learned_bpe(vocab_size: int, num_texts: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens (id order) and merges of a byte-level BPE trained on the task's texts with
    Qwen2's pre-tokenization, at most ``vocab_size`` tokens."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    pipeline = Qwen2Tokenizer()._tokenizer  # Qwen2's normalizer / pre-tokenizer, nothing else
    tok.normalizer, tok.pre_tokenizer = pipeline.normalizer, pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=byte_chars(), special_tokens=[])
    tok.train_from_iterator(task_texts(num_texts), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    return tokens, [tuple(m) for m in model["merges"]]


def build_tokenizer(vocab_size: int, seed: int, num_texts: int = 2000):
    """A ``Qwen2Tokenizer`` with exactly ``vocab_size`` tokens, ids 0..vocab_size-1."""
    from transformers import Qwen2Tokenizer

    bpe_size = vocab_size - len(SPECIAL_TOKENS)
    tokens, merges = learned_bpe(min(LEARNED_VOCAB, bpe_size // 2), num_texts)
    vocab = {t: i for i, t in enumerate(tokens)}
    rng = random.Random(seed)
    printable = [byte_chars()[b] for b in range(0x20, 0x7F)]
    while len(tokens) < bpe_size:
        # One printable byte appended to a random earlier token: a random recursive tree, so
        # generated tokens stay short (~log of the vocabulary in bytes), like real ones.
        left, right = tokens[rng.randrange(len(tokens))], rng.choice(printable)
        if left + right in vocab:
            continue
        vocab[left + right] = len(tokens)
        tokens.append(left + right)
        merges.append((left, right))
    for special in SPECIAL_TOKENS:
        vocab[special] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE, model_max_length=32768,
        clean_up_tokenization_spaces=False)


def build_model(tokenizer, args):
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02, dtype="float32")
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=128, do_sample=False)
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: outputs/vocab-model-V)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    args = p.parse_args(argv)
    if args.vocab_size < 512:
        p.error(f"--vocab-size must be >= 512 (256 bytes, merges, 3 specials), "
                f"got {args.vocab_size}")
    for name in ("hidden", "intermediate", "layers", "heads", "kv_heads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads}), and "
                f"--heads of --kv-heads ({args.kv_heads})")
    if args.out is None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        args.out = os.path.join(root, "outputs", f"vocab-model-{args.vocab_size}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(args.vocab_size, args.seed)
    model = build_model(tokenizer, args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_atomically(model, tokenizer, args.out)
    params = sum(p.numel() for p in model.parameters())
    example = tokenizer.apply_chat_template(
        [{"role": "user", "content": question(next(iter_expressions("val", seed=1)))}],
        tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer(example, add_special_tokens=False)["input_ids"])
    print(f"wrote {args.out}: Qwen2 {params / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}, "
          f"hidden {args.hidden}, {args.layers} layers, an R1 prompt of {prompt_tokens} tokens; "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
