"""Shared fixtures. DeepSpeed JIT-compiles a small communication op on first use (~50 s on this
machine); caching it under ~/.cache keeps later runs fast."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path.home() / ".cache" / "icpo" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_random_model_dir(tmp_path_factory) -> Path:
    """A randomly initialized 2-layer Qwen2 with the bundled tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from icpo.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("icpo/tiny"))
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny_random")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: tiny models run fastest on one, the machine is
    shared, and it keeps float reductions in one order (runs compared for equality)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(items):
    """Every test that needs a GPU carries the ``cuda`` mark, so ``pytest -m cuda`` (what
    tools/gpu_check.sh runs) takes them all: those marked so, and those named for CUDA
    (``test_cuda_*``, or a ``cuda`` parameter)."""
    for item in items:
        if "cuda" in item.name and item.get_closest_marker("cuda") is None:
            item.add_marker(pytest.mark.cuda)
