"""scripts/make_vocab_model.py (the real-vocabulary testbed) on a small variant built by the same
code: transformers loads it as a Qwen2 with a Qwen2Tokenizer, the tokenizer has one token per id
of the embedding, the build is byte-reproducible across processes, and icpo's trainer accepts
it (preflight, tokenizer, prompts, one rollout)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_vocab_model.py"
SMALL = ["--vocab-size", "1000", "--hidden", "64", "--intermediate", "96", "--layers", "2",
         "--heads", "4", "--kv-heads", "2", "--seed", "3"]


def load_script():
    spec = importlib.util.spec_from_file_location("make_vocab_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The small variant built twice: in a fresh interpreter (the tokenizers library's hashing
    is per process) and in this one."""
    root = tmp_path_factory.mktemp("vocab_model")
    a, b = root / "a", root / "b"
    proc = subprocess.run([sys.executable, str(SCRIPT), *SMALL, "--out", str(a)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {a}" in proc.stdout and "vocabulary 1000" in proc.stdout
    assert load_script().main([*SMALL, "--out", str(b)]) == 0
    return a, b


def test_byte_reproducible(built):
    a, b = built
    names = sorted(p.name for p in a.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_the_seed_sets_generated_tokens_and_weights():
    import torch

    mod = load_script()
    tok3, tok4 = mod.build_tokenizer(1000, seed=3), mod.build_tokenizer(1000, seed=4)
    v3, v4 = tok3.get_vocab(), tok4.get_vocab()
    learned = [t for t, i in v3.items() if i < 256]  # the byte alphabet at least is shared
    assert all(v4[t] == v3[t] for t in learned) and v3 != v4
    w3 = mod.build_model(tok3, mod.parse_args([*SMALL[:-1], "3"])).lm_head.weight
    w4 = mod.build_model(tok3, mod.parse_args([*SMALL[:-1], "4"])).lm_head.weight
    assert not torch.equal(w3, w4)


def test_loads_as_qwen2_with_every_id_covered(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[0])
    model = AutoModelForCausalLM.from_pretrained(built[0])
    vocab = model.config.vocab_size
    assert type(model).__name__ == "Qwen2ForCausalLM" and type(tok).__name__ == "Qwen2Tokenizer"
    assert vocab == len(tok) == 1000
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    tokens = tok.convert_ids_to_tokens(list(range(vocab)))
    assert None not in tokens and len(set(tokens)) == vocab
    assert tok.convert_tokens_to_ids(tokens) == list(range(vocab))
    assert sorted(tok.get_vocab().values()) == list(range(vocab))
    assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_start|>") == vocab - 2
    assert model.config.eos_token_id == tok.eos_token_id == vocab - 1
    assert model.config.pad_token_id == tok.pad_token_id == vocab - 3
    # Byte level: any text, non-ASCII included, encodes and decodes back.
    text = "Compute: (17 - 25) * 3 + 9\n<think> naïve 17-25=-8 </think> <answer> -15 </answer> 三"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    logits = model(torch.tensor([[0, 5, vocab - 1]])).logits
    assert logits.shape == (1, 3, vocab)


def test_the_trainer_accepts_it(built, tmp_path):
    """Preflight, the trainer's tokenizer and prompt dataset, and one rollout of the HF engine on
    arithmetic prompts, without training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icpo.config import load_config
    from icpo.data import PromptDataset
    from icpo.rollout import HFRolloutEngine, SamplingParams
    from icpo.tasks.arithmetic import make_records, write_jsonl
    from icpo.trainer.preflight import preflight

    data = tmp_path / "train.jsonl"
    write_jsonl(make_records("train", 4), data)
    preset = Path(__file__).resolve().parents[1] / "examples" / "configs" / "tiny_cpu.yaml"
    cfg = load_config(str(preset), [f"model.path={built[0]}", f"data.train_files=[{data}]",
                                    "data.val_files=[]", f"trainer.output_dir={tmp_path / 'run'}",
                                    "actor.kl_coef=0.001"])
    pre = preflight(cfg)
    tok = AutoTokenizer.from_pretrained(cfg.model.path, padding_side="left")  # as the trainer
    dataset = PromptDataset(pre.train_records, tok, cfg.data)
    assert len(dataset.items) == 4 and dataset.num_skipped == 0
    prompts = [item.prompt_ids for item in dataset.items]
    assert all(0 <= t < len(tok) for p in prompts for t in p)
    assert all(item.prompt_text.endswith("<|im_start|>assistant\n") for item in dataset.items)
    model = AutoModelForCausalLM.from_pretrained(built[0])
    engine = HFRolloutEngine(model, tok)
    assert engine.decoder == "icpo"
    batch = engine.generate(prompts[:2], SamplingParams(n=2, max_new_tokens=5, seed=0))
    assert len(batch) == 4 and all(len(r) >= 1 for r in batch.response_ids)


def test_refuses_a_vocabulary_too_small():
    mod = load_script()
    with pytest.raises(SystemExit):
        mod.parse_args(["--vocab-size", "300"])
