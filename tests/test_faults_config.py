"""Fault injection: config values the float32 math cannot hold, ranges that cross-field rules
divide by, config files that are not UTF-8 (issue 22). Each is a one-line ConfigError naming the
field or the file, raised when the config is loaded, before any work.
"""

from __future__ import annotations

import pytest

from icpo.config import ConfigError, config_from_dict, load_config


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(None, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("override,field", [
    ("reward.answer_weight=1e39", "reward.answer_weight"),
    ("reward.format_weight=1e39", "reward.format_weight"),
    ("reward.noise_magnitude=1e39", "reward.noise_magnitude"),
    ("algorithm.tau=1e-40", "algorithm.tau"),
    ("algorithm.delta=1e-45", "algorithm.delta"),
    ("actor.lr=1e39", "actor.lr"),
    ("actor.kl_coef=1e300", "actor.kl_coef"),
    ("actor.betas=[0.9, 1e-41]", "actor.betas"),
])
def test_values_float32_cannot_hold(override, field):
    msg = refused(override)
    assert msg.startswith(f"invalid config: {field}: got ") and "float32" in msg, msg


@pytest.mark.parametrize("override", ["reward.answer_weight=1e7", "reward.noise_magnitude=1e20"])
def test_reward_scales_bounded(override):
    assert "expected <= 1e+06" in refused(override)


def test_small_and_zero_values_still_pass():
    cfg = config_from_dict(None, ["algorithm.tau=1e-30", "reward.noise_magnitude=0",
                                  "reward.answer_weight=1e6", "actor.weight_decay=0.0"])
    assert cfg.algorithm.tau == 1e-30


@pytest.mark.parametrize("override,field", [
    ("actor.ppo_mini_batch_size=0", "actor.ppo_mini_batch_size"),
    ("actor.ppo_mini_batch_size=-4", "actor.ppo_mini_batch_size"),
    ("trainer.train_batch_size=0", "trainer.train_batch_size"),
    ("trainer.total_steps=0", "trainer.total_steps"),
])
def test_zero_divisors_are_config_errors(override, field):
    assert refused(override).startswith(f"invalid config: {field}: got ")


def test_config_file_not_utf8(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes("trainer:\n  output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: not UTF-8") and "\n" not in msg, msg


def test_config_file_unreadable(tmp_path):
    p = tmp_path / "c.yaml"
    p.mkdir()  # a folder named like the file
    with pytest.raises((ConfigError, FileNotFoundError)) as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_duplicate_key_still_names_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("actor:\n  lr: 1.0e-5\nactor:\n  lr: 2.0e-5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: duplicate key 'actor'"):
        load_config(p)
