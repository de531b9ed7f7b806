"""Builds the bundled tiny reasoning model ``icpo/tiny`` (tokenizer + Llama weights) from scratch.

1. Trains a small byte-level BPE tokenizer on the arithmetic task's texts, the Table 5 (R1) system
   prompt included, with every digit its own token so arithmetic is learnable.
2. Pretrains a ~0.9M-parameter ``LlamaForCausalLM`` by SFT on (R1 prompt -> gold step-by-step
   response), loss on the response tokens only, with fixed seeds.
3. Stops as soon as greedy accuracy on held-out ``test`` problems reaches ``--target-acc``, so the
   model is partly right and RL has room to climb; reports greedy accuracy and pass@k (temperature
   1.0) on held-out ``val`` problems, and writes everything to ``icpo/models/tiny`` atomically.

Reproduce the committed files byte for byte (about 3 minutes on one core of the 2-core dev
machine; 400 SFT steps of 64 problems, stopping at 29% held-out test accuracy)::

    python scripts/make_tiny_model.py            # defaults = the committed model

Determinism: seeds are fixed and the default runs on one thread; other thread counts or CPUs can
change float rounding and so the exact weights (not the accuracy band).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from icpo.data.templates import R1_SYSTEM_PROMPT
from icpo.models import bundled_model_dir
from icpo.tasks.arithmetic import Difficulty, gold_response, iter_expressions, question, solve

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen-style; with no system message the R1 system prompt is inserted, as the model was trained.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n' + " + repr(R1_SYSTEM_PROMPT) + " + '<|im_end|>\\n' -}}"
    "{%- set rest = messages -%}"
    "{%- endif -%}"
    "{%- for message in rest -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_ANSWER_RE = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")


def build_tokenizer(vocab_size: int, num_texts: int,
                    difficulty: Difficulty) -> PreTrainedTokenizerFast:
    """Byte-level BPE over digit-split text; merges may cross spaces so the fixed prompt
    compresses."""
    tok = Tokenizer(models.BPE())
    # Digits first (each digit its own pre-token, never merged), then bytes without the GPT-2
    # word regex, so the repeated system prompt can merge into a handful of tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )

    def texts():
        # The segments between special tokens, cut exactly where prompt and response meet.
        exprs = iter_expressions("train", seed=1, difficulty=difficulty)
        for _ in range(num_texts):
            expr = next(exprs)
            yield from ("system\n" + R1_SYSTEM_PROMPT, "\n", "user\n" + question(expr), "\n")
            yield from ("assistant\n", gold_response(expr))

    tok.train_from_iterator(texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], chat_template=CHAT_TEMPLATE,
        model_max_length=512, clean_up_tokenization_spaces=False,
    )


def build_model(tokenizer, args) -> LlamaForCausalLM:
    """Llama with head_dim 64 (what vLLM's attention backends expect) and tied embeddings.

    Llama rather than Qwen2: transformers 5 loads every ``qwen2`` checkpoint's tokenizer as
    ``Qwen2Tokenizer``, which replaces the saved pre-tokenizer with Qwen's word-splitting regex
    and so undoes the compression of the system prompt (207 instead of ~20 prompt tokens). For a
    ``llama`` checkpoint AutoTokenizer keeps tokenizer.json as saved, in transformers and vLLM.
    """
    vocab = -(-len(tokenizer) // 64) * 64  # rows padded to a multiple of 64, as Qwen does
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.kv_heads, head_dim=64, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
        attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02, dtype="float32",
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=128, do_sample=False,
    )
    return model


def prompt_ids(tokenizer, expr: str) -> list[int]:
    """Token ids of the R1-templated prompt for ``expr`` (ends with the assistant header)."""
    messages = [{"role": "system", "content": R1_SYSTEM_PROMPT},
                {"role": "user", "content": question(expr)}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sft_batch(tokenizer, exprs: list[str],
              responses: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids [B, L]`` and ``labels [B, L]`` (-100 outside response + EOS).

    ``responses`` (one per expression) default to the gold responses. Right padding needs no
    attention mask under causal attention: pads only follow real tokens.
    """
    seqs, masks = [], []
    for i, expr in enumerate(exprs):
        p = prompt_ids(tokenizer, expr)
        text = gold_response(expr) if responses is None else responses[i]
        r = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + r)
        masks.append([False] * len(p) + [True] * len(r))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = torch.where(torch.tensor(m), torch.tensor(s), -100)
    return ids, labels


def extract_int(text: str) -> int | None:
    """The integer inside the last ``<answer>...</answer>``; None when absent or not an integer."""
    found = _ANSWER_RE.findall(text)
    return int(found[-1]) if found else None


@torch.no_grad()
def evaluate(model, tokenizer, exprs: list[str], k: int = 1, temperature: float = 0.0,
             batch: int = 128):
    """Fraction of ``exprs`` with at least one correct answer among ``k`` samples (greedy if
    T=0)."""
    model.eval()
    tokenizer.padding_side = "left"
    hits = 0
    for start in range(0, len(exprs), batch):
        chunk = exprs[start : start + batch]
        enc = tokenizer.pad({"input_ids": [prompt_ids(tokenizer, e) for e in chunk]},
                            return_tensors="pt")
        sample = temperature > 0
        out = model.generate(
            **enc, max_new_tokens=64, do_sample=sample, num_return_sequences=k,
            **({"temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {}),
        )
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :],
                                       skip_special_tokens=True)
        for i, expr in enumerate(chunk):
            truth = solve(expr)[1]
            hits += any(extract_int(t) == truth for t in texts[i * k : (i + 1) * k])
    model.train()
    return hits / len(exprs)


def held_out(split: str, n: int, difficulty: Difficulty) -> list[str]:
    """``n`` distinct held-out expressions (the same ones make_records(split, n) holds)."""
    from icpo.tasks.arithmetic import make_records

    return [r["extra_info"]["expression"] for r in make_records(split, n, difficulty=difficulty)]


def sft_step(model, opt, sched, ids: torch.Tensor, labels: torch.Tensor) -> float:
    """One SFT optimizer step on ``(ids, labels)`` (grad clip 1.0); returns the loss. Shared
    with ``make_routes_model.py``: the op order is part of the byte-reproducible weights."""
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train(model, tokenizer, args, difficulty: Difficulty) -> int:
    """SFT until greedy accuracy on held-out ``test`` problems reaches ``args.target_acc``."""
    monitor = held_out("test", args.monitor_n, difficulty)
    stream = iter_expressions("train", seed=args.seed, difficulty=difficulty)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup))
    model.train()
    t0, loss_sum = time.time(), 0.0
    for step in range(1, args.max_steps + 1):
        ids, labels = sft_batch(tokenizer, [next(stream) for _ in range(args.batch_size)])
        loss_sum += sft_step(model, opt, sched, ids, labels)
        if step % args.eval_every == 0:
            acc = evaluate(model, tokenizer, monitor)
            print(f"step {step:5d}  loss {loss_sum / args.eval_every:.4f}  "
                  f"test greedy acc {acc:.3f}  {time.time() - t0:.0f}s", flush=True)
            loss_sum = 0.0
            if acc >= args.target_acc:
                return step
    raise SystemExit(f"did not reach --target-acc {args.target_acc} "
                     f"within --max-steps {args.max_steps}")


def _make_readable(folder: str) -> None:
    # mkdtemp and the savers create owner-only entries; a shipped package must be world-readable.
    os.chmod(folder, 0o755)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)


def save_atomically(model, tokenizer, out: str) -> None:
    """Writes into a sibling temp folder, then swaps it in, so ``out`` is never half-written."""
    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(tmp, save_jinja_files=False)  # chat template in tokenizer_config
        _make_readable(tmp)
        old = out + ".old"
        if os.path.exists(out):
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(bundled_model_dir()), help="output folder")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 = reproducible weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--tokenizer-texts", type=int, default=20000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--monitor-n", type=int, default=512, help="held-out test problems for stopping")
    p.add_argument("--target-acc", type=float, default=0.28)
    p.add_argument("--report-n", type=int, default=500, help="held-out val problems for the report")
    p.add_argument("--pass-k", type=int, default=5)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    difficulty = Difficulty()
    t0 = time.time()
    tokenizer = build_tokenizer(args.vocab_size, args.tokenizer_texts, difficulty)
    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    example = held_out("val", 1, difficulty)[0]
    print(f"tokenizer: {len(tokenizer)} tokens; prompt of {example!r}: "
          f"{len(prompt_ids(tokenizer, example))} tokens; model: {n_params} parameters; "
          f"{time.time() - t0:.0f}s", flush=True)
    steps = train(model, tokenizer, args, difficulty)
    report = held_out("val", args.report_n, difficulty)
    torch.manual_seed(args.seed)
    greedy = evaluate(model, tokenizer, report)
    pass_k = evaluate(model, tokenizer, report, k=args.pass_k, temperature=1.0)
    pass_1 = evaluate(model, tokenizer, report, k=1, temperature=1.0)
    save_atomically(model, tokenizer, args.out)
    print(f"stopped after {steps} steps; val ({args.report_n}): greedy acc {greedy:.3f}, "
          f"pass@1(T=1) {pass_1:.3f}, pass@{args.pass_k}(T=1) {pass_k:.3f}; "
          f"saved to {args.out}; total {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
