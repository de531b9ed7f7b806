"""Fault injection: a broken model folder (issue 22). Each case builds a broken copy of the
bundled tiny model and asserts a one-line UserError naming the folder and the problem, raised by
the checks preflight, ``icpo eval`` and ``icpo filter-coarse`` run before any weights load;
NaN weights are refused right after the load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from icpo.errors import UserError
from icpo.models import bundled_model_dir
from icpo.models.check import check_model_folder
from icpo.trainer.preflight import check_model_path


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(bundled_model_dir(), d)
    return d


def refused(folder: Path, *match: str, **kw) -> str:
    with pytest.raises(UserError) as e:
        check_model_path("model.path", str(folder), **kw)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.path"), msg
    for m in match:
        assert m in msg, msg
    return msg


def test_bundled_model_passes(model):
    assert check_model_path("model.path", str(model)) == str(model)
    assert check_model_path("model.path", "icpo/tiny") == str(bundled_model_dir())


def test_no_tokenizer(model):
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    refused(model, str(model), "tokenizer")


def test_no_weights(model):
    (model / "model.safetensors").unlink()
    refused(model, str(model), "no weight files")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_broken_safetensors(model, how):
    f = model / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x17" * 4096,
                   "empty": b""}[how])
    refused(model, str(model), "model.safetensors", "not a readable safetensors")


def test_truncated_bin(model):
    sd = {"w": torch.zeros(64)}
    (model / "model.safetensors").unlink()
    torch.save(sd, model / "pytorch_model.bin")
    check_model_folder(model)  # a whole file passes
    data = (model / "pytorch_model.bin").read_bytes()
    (model / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    refused(model, "pytorch_model.bin")


def test_sharded_index(model):
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(model, "model-00002-of-00002.safetensors is missing")
    (model / "model.safetensors.index.json").write_text("{not json")
    refused(model, "model.safetensors.index.json", "shard index")


@pytest.mark.parametrize("text,match", [("{broken", "not valid JSON"),
                                        ("[1, 2]", "expected an object")])
def test_invalid_config_json(model, text, match):
    (model / "config.json").write_text(text)
    refused(model, "config.json", match)


def test_unknown_model_type(model):
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (model / "config.json").write_text(json.dumps(cfg))
    refused(model, "'no_such_arch'", "model_type")


def test_bad_attn_implementation(model):
    with pytest.raises(UserError, match="model.attn_implementation: got 'flash_attn_9'; expected"):
        check_model_path("model.path", str(model), "flash_attn_9")
    check_model_path("model.path", str(model), "sdpa")
    check_model_path("model.path", str(model), "eager")


def test_vocab_smaller_than_tokenizer(model):
    cfg = json.loads((model / "config.json").read_text())
    cfg["vocab_size"] = 100  # the tokenizer has 512 tokens
    (model / "config.json").write_text(json.dumps(cfg))
    refused(model, "vocab_size 100", "smaller than the tokenizer's")


def test_nan_weights_refused_after_load(model):
    from safetensors.torch import load_file, save_file

    from icpo.models.loading import load_causal_lm

    sd = load_file(model / "model.safetensors")
    name = sorted(sd)[0]
    sd[name][0] = float("nan")
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    check_model_folder(model)  # headers are fine: only the load can see the values
    with pytest.raises(UserError, match="holds NaN or inf values") as e:
        load_causal_lm(str(model), torch.float32, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_local_typo_not_answered_with_hf_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for typo in ["./modle", str(tmp_path / "nope"), "models/qwen", "out/ckpt/step_1/model"]:
        with pytest.raises(UserError) as e:
            check_model_path("--model", typo)
        assert "hf download" not in str(e.value) and "no such folder" in str(e.value), typo
    with pytest.raises(UserError, match="hf download Qwen/Qwen2.5-0.5B"):
        check_model_path("--model", "Qwen/Qwen2.5-0.5B")


def test_eval_refuses_broken_folder_before_load(model, tmp_path, monkeypatch, capsys):
    from icpo import cli
    from icpo.models import loading
    from icpo.tasks.arithmetic import make_records, write_jsonl

    write_jsonl(make_records("val", 2), tmp_path / "val.jsonl")
    (model / "model.safetensors").write_bytes(b"garbage")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_causal_lm", no_load)
    code = cli.main(["eval", "--model", str(model), "--data", str(tmp_path / "val.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("icpo eval: error: --model: model folder"), err
    assert len(err.splitlines()) == 1


def test_filter_coarse_refuses_broken_folder(model, tmp_path):
    from icpo.data.coarse import CoarseFilterSpec, filter_coarse
    from icpo.tasks.arithmetic import make_records, write_jsonl

    write_jsonl(make_records("train", 2), tmp_path / "t.jsonl")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    spec = CoarseFilterSpec(model=str(model), train_files=[str(tmp_path / "t.jsonl")],
                      output=str(tmp_path / "o.jsonl"))
    with pytest.raises(UserError, match="tokenizer"):
        filter_coarse(spec)
    assert not (tmp_path / "o.jsonl").exists()
