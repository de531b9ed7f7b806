"""Tests for the bundled tiny model ``icpo/tiny``: files, tokenizer, chat template, generation."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from icpo.data.templates import R1_SYSTEM_PROMPT
from icpo.models import TINY_MODEL, bundled_model_dir, resolve_model_path
from icpo.tasks.arithmetic import make_records

RESPONSE_RE = re.compile(r"^<think> \S.* </think> <answer> (-?\d+) </answer>$")
MODEL_DIR = resolve_model_path(TINY_MODEL)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def _prompt(tokenizer, content, system=True):
    messages = [{"role": "user", "content": content}]
    if system:
        messages.insert(0, {"role": "system", "content": R1_SYSTEM_PROMPT})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_resolve_model_path():
    assert MODEL_DIR == str(bundled_model_dir()) and os.path.isabs(MODEL_DIR)
    assert os.path.samefile(MODEL_DIR, os.path.join(os.path.dirname(__file__), "..", "icpo",
                                                    "models", "tiny"))
    assert resolve_model_path("Qwen/Qwen2.5-7B") == "Qwen/Qwen2.5-7B"
    assert resolve_model_path("/some/dir") == "/some/dir"


def test_files_small_and_complete():
    names = set(os.listdir(MODEL_DIR))
    assert {"config.json", "generation_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json"} <= names
    total = sum(os.path.getsize(os.path.join(MODEL_DIR, n)) for n in names)
    assert total <= 10 * 2**20, total
    config = json.load(open(os.path.join(MODEL_DIR, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] in (64, 128)  # vLLM backends
    assert config["tie_word_embeddings"] is True


def test_tokenizer_round_trip_and_digits(tokenizer):
    for text in ["<think> 17-25=-8, -8*3=-24 </think> <answer> -15 </answer>",
                 "Compute: (17 - 25) * 3 + 9", "unseen text: Grüße, 你好 ~|\t\n 0042"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    ids = tokenizer("x 9081726354 y", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("9081726354")
    # no token in the vocabulary holds more than one digit
    vocab = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.get_vocab()]
    assert all(sum(c.isdigit() for c in t) <= 1 for t in vocab)
    assert 256 < len(tokenizer) <= 1024


def test_special_tokens(tokenizer, model):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    im_end, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert (tokenizer("a<|im_start|>b<|im_end|>", add_special_tokens=False)["input_ids"][-1]
            == im_end)
    assert model.config.eos_token_id == im_end and model.config.pad_token_id == pad
    assert im_end in model.generation_config.eos_token_id
    assert model.config.vocab_size >= len(tokenizer)


def test_chat_template_renders_table5_prompt(tokenizer):
    text = _prompt(tokenizer, "Compute: 1 + 2")
    assert text == (f"<|im_start|>system\n{R1_SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\nCompute: 1 + 2<|im_end|>\n<|im_start|>assistant\n")
    assert _prompt(tokenizer, "Compute: 1 + 2", system=False) == text  # R1 prompt by default
    other = tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
         {"role": "assistant", "content": "A"}],
        tokenize=False)
    assert other == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                     "<|im_start|>assistant\nA<|im_end|>\n")
    # the fixed system prompt compresses to a few tokens, so the whole prompt is short
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < 40


def test_loads_offline_and_answers_in_format():
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from icpo.models import resolve_model_path\n"
        "p = resolve_model_path('icpo/tiny')\n"
        "tok = AutoTokenizer.from_pretrained(p); m = AutoModelForCausalLM.from_pretrained(p)\n"
        "t = tok.apply_chat_template([{'role': 'user', 'content': 'Compute: (17 - 25) * 3 + 9'}],"
        " add_generation_prompt=True, tokenize=False)\n"
        "ids = tok(t, return_tensors='pt', add_special_tokens=False).input_ids\n"
        "out = m.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1]:]\n"
        "assert out[-1].item() == tok.eos_token_id, out\n"
        "sys.stdout.write(tok.decode(out, skip_special_tokens=True))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME="/nonexistent-hf-home")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd="/")
    assert res.returncode == 0, res.stderr[-2000:]
    assert RESPONSE_RE.match(res.stdout), res.stdout


@torch.no_grad()
def test_heldout_accuracy_band(tokenizer, model):
    recs = make_records("val", 50)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
             for r in recs]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=64, do_sample=False)
    responses = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    well_formed = [RESPONSE_RE.match(r) for r in responses]
    correct = sum(m is not None and m.group(1) == r["reward_model"]["ground_truth"]
                  for m, r in zip(well_formed, recs))
    assert sum(m is not None for m in well_formed) >= 45, responses
    assert 0.05 < correct / len(recs) < 0.9, correct  # partly right: RL has room
