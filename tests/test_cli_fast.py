"""The command line answers help and argument errors without importing torch; the config
reference (``icpo train --help``, docs/config.md) comes from the dataclasses; the thread
defaults follow their precedence; ``icpo data make-arithmetic`` writes the tiny task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icpo import runtime
from icpo.config import Config, doc, field_docs
from icpo.tasks.arithmetic import make_records

REPO = Path(__file__).resolve().parents[1]


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", runtime.OPT_OUT)}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=300)


NO_TORCH = "\nimport sys\nprint('torch' in sys.modules, 'icpo._C' in sys.modules)"


@pytest.mark.parametrize("argv,code", [(["--help"], 0), (["train", "--help"], 0),
                                       (["eval", "--help"], 0), (["train", "--bogus"], 2),
                                       (["eval"], 2),
                                       (["data", "make-arithmetic", "--train", "x"], 2)])
def test_help_and_argument_errors_do_not_import_torch(argv, code):
    proc = python(f"from icpo import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit as e:\n"
                  f"    assert e.code == {code}, e.code{NO_TORCH}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def test_config_error_is_reported_before_torch_is_imported():
    proc = python("from icpo import cli\nassert cli.main(['train', 'actor.lr=-1']) == 2" + NO_TORCH)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"
    assert "icpo train: error:" in proc.stderr and "actor.lr" in proc.stderr


def test_import_icpo_is_light_and_icpo_ops_registers_the_kernels():
    proc = python("import icpo, icpo.config" + NO_TORCH)
    assert proc.stdout.strip() == "False False", proc.stderr
    proc = python("import icpo, torch\nicpo.ops.segment_mean\n"
                  "print(hasattr(torch.ops.icpo, 'segment_mean'))")
    assert proc.stdout.strip() == "True", proc.stderr


def _leaf_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """The dotted leaf names from the dataclasses themselves, not from the docs' parser."""
    import dataclasses

    out: list[str] = []
    for f in dataclasses.fields(cls):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(sub):
            out += _leaf_fields(type(sub), f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_train_help_lists_every_config_field():
    from icpo import cli

    text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "docs/config.md" in text
    leaves = _leaf_fields()
    assert [f.name for f in doc.fields()] == leaves and "trainer.num_threads" in leaves
    for f in doc.fields():
        assert f"  {f.name}={f.default}" in text
        assert f.doc and " ".join(cli.plain(f.doc).split()[:4]) in " ".join(text.split()), f.name


def test_config_reference_is_generated_and_complete():
    text = (REPO / "docs" / "config.md").read_text()
    assert text == doc.markdown(), "docs/config.md is stale: run python tools/gen_config_doc.py"
    documented = field_docs(Config)
    sections = {n.rsplit(".", 1)[0] for n in _leaf_fields() if "." in n}
    for name in [*_leaf_fields(), *sections]:
        assert documented.get(name), f"{name} has no docstring in icpo/config/schema.py"
    for name in _leaf_fields():
        assert f"| `{name}` |" in text and documented[name].split()[0] in text
    assert "| `actor.kl_estimator` | one of 'k3', 'k1', 'k2' | `k3` |" in text


def test_thread_setting_precedence():
    assert runtime.resolve_num_threads(3, {"OMP_NUM_THREADS": "2"}) == (3, "trainer.num_threads")
    assert runtime.resolve_num_threads(None, {"OMP_NUM_THREADS": "2"}) == (None, "OMP_NUM_THREADS")
    assert runtime.resolve_num_threads(None, {runtime.OPT_OUT: "1"}) == (None, runtime.OPT_OUT)
    threads, source = runtime.resolve_num_threads(None, {})
    assert source == "auto" and threads == runtime.auto_num_threads()
    assert [runtime.auto_num_threads(c, 1) for c in (1, 2, 4, 7, 8, 16)] == [1, 1, 1, 1, 2, 4]
    assert runtime.auto_num_threads(64, 8) == 2 and runtime.auto_num_threads(2, 8) == 1


@pytest.mark.parametrize("env,policy", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                        ({runtime.OPT_OUT: "1"}, None)])
def test_wait_policy_default_respects_the_user(env, policy):
    proc = python("import os\nfrom icpo.runtime import set_thread_env_defaults\n"
                  "set_thread_env_defaults()\nprint(os.environ.get('OMP_WAIT_POLICY'))", **env)
    assert proc.stdout.strip() == str(policy), proc.stderr


def test_wait_policy_left_alone_once_torch_is_loaded():
    proc = python("import os, torch\nfrom icpo.runtime import set_thread_env_defaults\n"
                  "set_thread_env_defaults()\nprint(os.environ.get('OMP_WAIT_POLICY'))")
    assert proc.stdout.strip() == "None", proc.stderr


def test_apply_num_threads(one_thread):
    import torch

    assert runtime.apply_num_threads(2) == 2 == torch.get_num_threads()


def test_make_arithmetic_writes_the_tiny_task(tmp_path):
    from icpo import cli

    argv = ["data", "make-arithmetic", "--out", str(tmp_path), "--train", "6", "--val", "3"]
    assert cli.main(argv) == 0
    train = [json.loads(ln) for ln in (tmp_path / "train.jsonl").read_text().splitlines()]
    val = [json.loads(ln) for ln in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert train == make_records("train", 6) and val == make_records("val", 3)
    assert not (tmp_path / "test.jsonl").exists()


def test_generate_reports_progress_per_batch(tiny_random_model_dir, one_thread):
    """``icpo eval``'s progress bar advances by each ``generate`` batch, to the prompt count."""
    from transformers import AutoModelForCausalLM

    from icpo.rollout import SamplingParams
    from icpo.rollout.hf import HFRolloutEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_random_model_dir)
    engine = HFRolloutEngine(model, pad_token_id=0, eos_token_id=1, batch_size=2)
    done: list[int] = []
    engine.on_batch = done.append
    out = engine.generate([[5, 6], [7], [8, 9, 10], [11], [12]],
                          SamplingParams(n=2, temperature=0.0, max_new_tokens=3))
    assert done == [2, 2, 1] and len(out.response_ids) == 10
