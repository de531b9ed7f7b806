"""icpo.integrations.trl faults (issue 22): ``ICPOTrainer(args=None)`` builds a default
ICPOConfig as GRPOTrainer builds a GRPOConfig; its ``__init__`` shows GRPOTrainer's parameters
(IDEs, ``help()``); a GRPOConfig is refused before the model loads."""

import inspect

import pytest

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'icpo[trl]')")
if trl.__version__ != "1.16.0":
    pytest.skip(f"icpo.integrations.trl is pinned to trl 1.16.0, found {trl.__version__}",
                allow_module_level=True)

from trl import GRPOConfig, GRPOTrainer  # noqa: E402  (after the version skip)

from icpo.integrations.trl import ICPOConfig, ICPOTrainer  # noqa: E402  (after the version skip)
from icpo.models import resolve_model_path  # noqa: E402  (after the version skip)

MODEL = resolve_model_path("icpo/tiny")


def test_init_shows_grpo_trainers_parameters():
    mine = inspect.signature(ICPOTrainer.__init__).parameters
    theirs = inspect.signature(GRPOTrainer.__init__).parameters
    assert [p for p in mine if p != "kwargs"] == list(theirs)
    for name, p in theirs.items():
        assert mine[name].default == p.default, name
    assert "reward_funcs" in str(inspect.signature(ICPOTrainer))


def test_args_none_builds_a_default_icpo_config(tmp_path, monkeypatch, one_thread):
    from datasets import Dataset

    import icpo.integrations.trl as integration

    class CpuDefaults(ICPOConfig):
        """ICPOConfig's defaults, but on this CPU (TRL's default bf16 needs a GPU: GRPOConfig()
        fails here alike)."""

        def __init__(self, *a, **k):
            super().__init__(*a, use_cpu=True, bf16=False, report_to="none", **k)

    monkeypatch.setattr(integration, "ICPOConfig", CpuDefaults)
    monkeypatch.chdir(tmp_path)
    data = Dataset.from_dict({"prompt": ["1 + 1 ="] * 8})
    t = ICPOTrainer(model=MODEL, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                    train_dataset=data)
    assert type(t.args) is CpuDefaults and isinstance(t.args, ICPOConfig)
    assert t.args.output_dir.endswith("tiny-ICPO")
    assert t.icpo_delta > 0


def test_a_grpo_config_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("GRPOTrainer.__init__ ran")

    monkeypatch.setattr(GRPOTrainer, "__init__", no_load)
    grpo = GRPOConfig(str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(TypeError, match="needs args=ICPOConfig"):
        ICPOTrainer(model=MODEL, reward_funcs=[], args=grpo)
