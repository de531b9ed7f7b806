"""LoRA through PEFT (icpo.models.lora) on the bundled tiny model, in float32 on the CPU: only
the adapters train, the adapters-off forward is the base model's, the merged weights are PEFT's
merge without touching the live weights, adapters save and load bit for bit, and ``icpo export``
writes a plain Hugging Face model. ZeRO-0 only (no DeepSpeed engine here)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from icpo import cli
from icpo.errors import UserError
from icpo.models import bundled_model_dir, lora

SEED = 0
RANK = 8
REPO = Path(__file__).resolve().parents[1]


def load_base() -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()


def inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(3, 500, (3, 11), generator=g)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def trained_lora(use_rslora: bool = False) -> nn.Module:
    """Rank-8 adapters moved off their zero start by a few Adam steps on a toy loss."""
    torch.manual_seed(SEED)  # PEFT draws A from the global generator
    model = lora.apply_lora(load_base(), RANK, lora_alpha=16, use_rslora=use_rslora)
    opt = torch.optim.Adam(lora.trainable_parameters(model), lr=1e-2)
    x = inputs()
    for _ in range(3):
        opt.zero_grad()
        model(x).logits[..., 7].mean().backward()  # push token 7's logit down
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained():
    return trained_lora()


@pytest.fixture(scope="module")
def adapter_dir(trained, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter")
    lora.save_adapters(trained, folder)
    return folder


def test_only_the_adapters_are_trainable(one_thread):
    base = load_base()
    linear = [m for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    model = lora.apply_lora(base, RANK)
    trainable = lora.trainable_parameters(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(trainable) == len(names) == 2 * len(linear) == 56  # 7 linear layers x 4 blocks
    # Rank r on an in x out layer adds r * (in + out) parameters.
    expected = sum(RANK * (m.in_features + m.out_features) for m in linear)
    assert sum(p.numel() for p in trainable) == expected
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) == sum(p.numel() for p in load_base().parameters())


def test_fresh_adapters_compute_the_base_model(one_thread):
    x = inputs()
    want = logits(load_base(), x)
    model = lora.apply_lora(load_base(), RANK).eval()
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert torch.equal(logits(model, x), want)


def test_adapters_disabled_gives_the_untouched_base(trained, one_thread):
    x = inputs()
    with_adapters = logits(trained, x)
    with lora.adapters_disabled(trained):
        off = logits(trained, x)
    assert torch.equal(off, logits(load_base(), x))
    assert (with_adapters - off).abs().max() > 1e-2  # the adapters did move
    assert torch.equal(logits(trained, x), with_adapters)  # back on after the block


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_state_is_peft_merge_and_leaves_the_live_weights(use_rslora, one_thread):
    model = trained_lora(use_rslora)
    from peft.tuners.lora import LoraLayer

    scaling = {m.scaling["default"] for m in model.modules() if isinstance(m, LoraLayer)}
    assert scaling == {16 / RANK ** 0.5 if use_rslora else 16 / RANK}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = []
    for name, _ in lora.iter_merged_parameters(model):
        names.append(name)
        assert torch.is_grad_enabled()  # the iterator leaks no no_grad into its consumer
    assert names == [n for n, _ in load_base().named_parameters()]
    merged = lora.merged_state(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) <= set(want)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-6, msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (merged[q] - before["base_model.model." + q.replace(".weight", ".base_layer.weight")]
            ).abs().max() > 1e-4  # the adapter's delta is in


def test_merged_state_in_a_fresh_base_model_gives_the_peft_logits(trained, one_thread):
    fresh = load_base()
    missing, unexpected = fresh.load_state_dict(lora.merged_state(trained), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    x = inputs()
    torch.testing.assert_close(logits(fresh, x), logits(trained, x), rtol=0, atol=1e-5)


def test_save_load_round_trip_is_bitwise_and_peft_loads_it(trained, adapter_dir, one_thread):
    from peft import PeftModel

    assert (adapter_dir / "adapter_config.json").is_file()
    torch.manual_seed(SEED + 1)  # other initial factors, so that loading has to overwrite them
    restored = lora.apply_lora(load_base(), RANK, lora_alpha=16)
    lora.load_adapters(restored, adapter_dir)
    want = dict(trained.named_parameters())
    for name, param in restored.named_parameters():
        assert torch.equal(param, want[name]), name
        assert param.requires_grad == want[name].requires_grad, name
    peft = PeftModel.from_pretrained(load_base(), str(adapter_dir))
    assert torch.equal(logits(peft, inputs()), logits(trained, inputs()))


def test_load_adapters_refuses_another_scaling(adapter_dir):
    other = lora.apply_lora(load_base(), RANK, lora_alpha=32)
    with pytest.raises(UserError, match="lora_alpha=16"):
        lora.load_adapters(other, adapter_dir)


def test_export_merged_writes_a_plain_model(trained, adapter_dir, tmp_path, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = lora.export_merged(None, adapter_dir, tmp_path / "merged")  # base from adapter_config
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not [m for m in model.modules() if type(m).__module__.startswith("peft")]
    torch.testing.assert_close(logits(model, inputs()), logits(trained, inputs()),
                               rtol=0, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).encode("1+2") == \
        AutoTokenizer.from_pretrained(bundled_model_dir()).encode("1+2")


def test_cli_export_from_a_checkpoint_folder(trained, adapter_dir, tmp_path, capsys, one_thread):
    step = tmp_path / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (step / "model").symlink_to(adapter_dir, target_is_directory=True)
    out = tmp_path / "merged"
    argv = ["export", "--model", "icpo/tiny", "--adapter", str(step), "--out", str(out)]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(out)
    assert cli.main(argv) == 2  # out exists now
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("icpo export: error: --out:")
    assert "--overwrite" in err
    assert cli.main([*argv, "--overwrite"]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(model, inputs()), logits(trained, inputs()),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["missing", "not_adapter", "bad_model"])
def test_cli_export_errors_are_one_line(case, adapter_dir, tmp_path, capsys):
    adapter = {"missing": tmp_path / "nope", "not_adapter": tmp_path}.get(case, adapter_dir)
    argv = ["export", "--adapter", str(adapter), "--out", str(tmp_path / "out")]
    if case == "bad_model":
        argv += ["--model", str(tmp_path / "no_model")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    flag = "--model" if case == "bad_model" else "--adapter"
    assert err.count("\n") == 1 and err.startswith(f"icpo export: error: {flag}:"), err
    assert not (tmp_path / "out").exists()


def test_cli_export_argument_errors_do_not_import_torch(tmp_path):
    code = (f"from icpo import cli\nassert cli.main(['export', '--adapter', {str(tmp_path)!r}, "
            "'--out', 'x']) == 2\nimport sys\nprint('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    assert "holds no adapter_config.json" in proc.stderr


def test_apply_lora_refuses_bad_settings():
    model = nn.Linear(2, 2)
    for kwargs, name in [({"lora_rank": 0}, "lora_rank"), ({"lora_rank": 4, "lora_alpha": 0},
                         "lora_alpha"), ({"lora_rank": 4, "lora_dropout": 1.0}, "lora_dropout"),
                         ({"lora_rank": 4, "target_modules": []}, "target_modules")]:
        with pytest.raises(ValueError, match=name):
            lora.apply_lora(model, **kwargs)
