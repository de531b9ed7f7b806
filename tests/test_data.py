"""icpo.data: verl-schema loading, Table 5 template, tokenized dataset, resumable sampler."""

import json
import os
import pathlib
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from icpo.config import DataConfig
from icpo.data import (
    R1_SYSTEM_PROMPT,
    DataError,
    PromptDataset,
    PromptSampler,
    build_prompt,
    load_files,
    load_records,
)

# The paper as Markdown, if you have it (not part of the repository): ICPO_PAPER_MD=path.
PAPER = pathlib.Path(os.environ.get("ICPO_PAPER_MD", "/nonexistent/icpo-2511.21005.md"))
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_LOCK = threading.Lock()
_CACHE = {}


def make_tokenizer(chat_template=True, add_bos=False):
    """A tiny byte-level BPE tokenizer trained on a few strings (no downloads)."""
    with _LOCK:
        if "tok" not in _CACHE:
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=400, special_tokens=["<s>", "</s>", "<|im_start|>", "<|im_end|>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            tok.train_from_iterator([R1_SYSTEM_PROMPT, "What is 2 + 3?", "User: Assistant:"] * 3,
                                    trainer)
            _CACHE["tok"] = tok.to_str()
    tok = Tokenizer.from_str(_CACHE["tok"])
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def record(prompt, answer="5", **extra):
    return {"data_source": "toy", "prompt": prompt, "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer}, "extra_info": extra}


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


MSGS = [{"role": "user", "content": "What is 2 + 3?"}]


# ----------------------------------------------------------------------------- loading

def test_jsonl_parquet_and_json_give_the_same_records(tmp_path):
    rows = [record(MSGS, "5", index=0), record("Plain text question?", 42, index=1)]
    jl = write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    a, b, c = (load_records(jl), load_records(tmp_path / "d.parquet"),
               load_records(tmp_path / "d.json"))
    assert a[0].prompt == MSGS and a[0].ground_truth == "5" and a[0].data_source == "toy"
    assert a[0].extra_info == {"index": 0} and a[0].index == 0
    assert a[1].prompt == "Plain text question?" and a[1].ground_truth == "42" and a[1].index == 1
    assert (b[0].prompt, b[0].ground_truth, b[0].extra_info) == (a[0].prompt, "5", {"index": 0})
    assert [(r.prompt, r.ground_truth) for r in c] == [(r.prompt, r.ground_truth) for r in a]
    assert a[1].location == f"{jl}:2"


def test_blank_lines_skipped_and_line_numbers_kept(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(record(MSGS)) + "\n\n" + json.dumps(record("q")) + "\n")
    recs = load_records(p)
    assert len(recs) == 2 and recs[1].location.endswith(":3")


def test_malformed_line_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [record(MSGS), record(MSGS)], ['{"prompt": "x", '])
    with pytest.raises(DataError, match=rf"{p}:3: invalid JSON"):
        load_records(p)
    p2 = write_jsonl(tmp_path / "arr.jsonl", [record(MSGS)], ["[1, 2]"])
    with pytest.raises(DataError, match=rf"{p2}:2: expected a JSON object"):
        load_records(p2)


@pytest.mark.parametrize("row, missing", [
    ({"data_source": "x", "reward_model": {"ground_truth": "1"}}, "'prompt'"),
    ({"prompt": "q", "reward_model": {"style": "rule"}}, "'reward_model.ground_truth'"),
    ({"prompt": "q"}, "'reward_model'"),
    ({"prompt": "q", "reward_model": {"ground_truth": None}}, "'reward_model.ground_truth'"),
])
def test_missing_key_names_file_line_and_key(tmp_path, row, missing):
    p = write_jsonl(tmp_path / "m.jsonl", [record(MSGS), row])
    with pytest.raises(DataError) as e:
        load_records(p)
    assert f"{p}:2" in str(e.value) and missing in str(e.value)


@pytest.mark.parametrize("prompt", [[], [{"role": "user"}], [{"content": "x"}], 5, "   "])
def test_bad_prompt_shapes_are_errors(tmp_path, prompt):
    p = write_jsonl(tmp_path / "p.jsonl", [record(prompt)])
    with pytest.raises(DataError, match=rf"{p}:1"):
        load_records(p)


def test_missing_file_and_custom_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")
    p = write_jsonl(tmp_path / "alt.jsonl", [{"question": "q?", "answer": {"value": "7"}}])
    recs = load_records(p, prompt_key="question", answer_key="answer.value")
    assert recs[0].prompt == "q?" and recs[0].ground_truth == "7" and recs[0].data_source == "alt"
    cfg = DataConfig(prompt_key="question", answer_key="answer.value")
    assert len(load_files([str(p), str(p)], cfg)) == 2
    with pytest.raises(DataError, match="no data files"):
        load_files([], cfg)


# ----------------------------------------------------------------------------- template

def test_r1_system_prompt_is_table5_verbatim():
    expected = ("A conversation between User and Assistant. The user asks a question, and the "
                "Assistant solves it. The assistant first thinks about the reasoning process in "
                "the mind and then provides the user with the answer. The reasoning process and "
                "answer are enclosed within <think> </think> and <answer> </answer> tags, "
                "respectively, i.e., <think> reasoning process here </think> <answer> answer "
                "here </answer>.")
    assert R1_SYSTEM_PROMPT == expected
    if PAPER.exists():  # the paper's own text, with its PDF line wrapping undone
        text = " ".join(PAPER.read_text().split())
        assert R1_SYSTEM_PROMPT in text


def test_build_prompt_with_chat_template():
    tok = make_tokenizer()
    text = build_prompt(tok, MSGS, "r1")
    assert text == (f"<|im_start|>system\n{R1_SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(tok, "What is 2 + 3?", "r1") == text  # text is wrapped as a user message
    own = [{"role": "system", "content": "Be brief."}] + MSGS
    assert R1_SYSTEM_PROMPT not in build_prompt(tok, own, "r1")
    assert build_prompt(tok, own, "r1").startswith("<|im_start|>system\nBe brief.")
    assert R1_SYSTEM_PROMPT not in build_prompt(tok, MSGS, "none")


def test_build_prompt_plain_format_without_chat_template():
    tok = make_tokenizer(chat_template=False)
    assert (build_prompt(tok, MSGS, "r1")
            == f"System: {R1_SYSTEM_PROMPT}\nUser: What is 2 + 3?\nAssistant:")
    assert build_prompt(tok, MSGS, "none") == "User: What is 2 + 3?\nAssistant:"
    assert build_prompt(tok, "Q: 2+3=", "none") == "Q: 2+3="
    bos_tok = make_tokenizer(chat_template=False, add_bos=True)
    assert build_prompt(bos_tok, MSGS, "r1").startswith("<s>System: ")
    with pytest.raises(ValueError, match="template"):
        build_prompt(tok, MSGS, "chatml")


# ----------------------------------------------------------------------------- dataset

def _records(tmp_path, prompts):
    return load_records(write_jsonl(tmp_path / "t.jsonl", [record(p) for p in prompts]))


@pytest.mark.parametrize("chat_template", [True, False])
def test_dataset_tokenizes_templated_prompts(tmp_path, chat_template):
    tok = make_tokenizer(chat_template)
    recs = _records(tmp_path, [MSGS, "Plain text question?"])
    ds = PromptDataset(recs, tok, DataConfig(max_prompt_length=10_000))
    assert len(ds) == 2 and ds.num_skipped == 0
    for item, rec in zip(ds.items, recs):
        assert item.record is rec
        assert item.prompt_text == build_prompt(tok, rec.prompt, "r1")
        assert item.prompt_ids == tok(item.prompt_text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ds[0].prompt_ids) == ds[0].prompt_text


def test_overlong_prompts_skipped_and_counted_or_error(tmp_path):
    tok = make_tokenizer()
    recs = _records(tmp_path, ["short?", "What is 2 + 3? " * 40, "ok?", "What is 2 + 3? " * 50])
    lengths = [len(tok(build_prompt(tok, r.prompt, "r1"), add_special_tokens=False)["input_ids"])
               for r in recs]
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit and lengths[3] > limit
    ds = PromptDataset(recs, tok, DataConfig(max_prompt_length=limit))
    assert ds.num_skipped == 2 and [it.record.index for it in ds.items] == [0, 2]
    # The limit is inclusive: a prompt of exactly max_prompt_length tokens is kept.
    assert max(len(it.prompt_ids) for it in ds.items) == limit
    with pytest.raises(DataError, match=rf"t.jsonl:2: prompt has {lengths[1]} tokens"):
        PromptDataset(recs, tok, DataConfig(max_prompt_length=limit, overlong_prompts="error"))
    with pytest.raises(DataError, match="all 4 prompts"):
        PromptDataset(recs, tok, DataConfig(max_prompt_length=3))


def test_dataset_chunks_do_not_change_results(tmp_path):
    tok = make_tokenizer()
    recs = _records(tmp_path, [f"question {i}?" for i in range(7)])
    a = PromptDataset(recs, tok, DataConfig(), chunk_size=3)
    b = PromptDataset(recs, tok, DataConfig())
    assert [x.prompt_ids for x in a.items] == [x.prompt_ids for x in b.items]


# ----------------------------------------------------------------------------- sampler

def _take(sampler, k):
    return [sampler.next_batch() for _ in range(k)]


def test_sampler_epochs_are_permutations_and_deterministic():
    s = PromptSampler(10, 5, shuffle=True, seed=3)
    batches = _take(s, 6)  # three epochs
    for e in range(3):
        epoch = batches[2 * e] + batches[2 * e + 1]
        assert sorted(epoch) == list(range(10))
    assert batches[0] + batches[1] != batches[2] + batches[3]  # reshuffled each epoch
    assert _take(PromptSampler(10, 5, True, 3), 6) == batches
    assert _take(PromptSampler(10, 5, True, 4), 6) != batches
    assert _take(PromptSampler(10, 5, False, 3), 3) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9],
                                                        [0, 1, 2, 3, 4]]


def test_sampler_batches_span_epoch_boundaries_without_dropping():
    s = PromptSampler(7, 3, shuffle=True, seed=0)
    flat = sum(_take(s, 7), [])  # 21 indices = exactly 3 epochs
    for e in range(3):
        assert sorted(flat[7 * e: 7 * e + 7]) == list(range(7))
    big = PromptSampler(2, 5, shuffle=False)
    assert big.next_batch() == [0, 1, 0, 1, 0]


def test_sampler_resume_mid_epoch_continues_identically():
    ref = PromptSampler(11, 4, shuffle=True, seed=9)
    head = _take(ref, 4)  # ends mid-epoch 1
    state = ref.state_dict()
    assert state["epoch"] == 1 and 0 < state["position"] < 11
    tail = _take(ref, 6)
    resumed = PromptSampler(11, 4, shuffle=True, seed=9)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert _take(resumed, 6) == tail
    assert head != tail[:4]


def test_sampler_rejects_mismatched_state_and_bad_args():
    state = PromptSampler(11, 4, seed=9).state_dict()
    with pytest.raises(ValueError, match="num_items"):
        PromptSampler(12, 4, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(11, 4, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="num_items"):
        PromptSampler(0, 4)
    with pytest.raises(ValueError, match="batch_size"):
        PromptSampler(4, 0)
