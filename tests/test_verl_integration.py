"""icpo.integrations.verl on verl's own DataProto and registry (verl 0.9.1, imported on CPU).

verl is not an icpo dependency (its pip install pulls a CUDA stack), so CI installs verl and
what its imports need without their dependencies, into a folder of their own, and runs this
file with ICPO_REQUIRE_VERL=1 (a missing verl then fails instead of skipping):

    pip install --no-deps --target DIR verl==0.9.1 ray==2.60.0 omegaconf==2.4.0 \
        codetiming==1.4.0 tensordict==0.15.3 pyvers==0.2.3 cloudpickle==3.1.3 orjson==3.13.0 \
        protobuf==7.36.2 requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 \
        jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
        rpds-py==2026.9.1 attrs==26.1.0
    ICPO_REQUIRE_VERL=1 PYTHONPATH=DIR pytest tests/test_verl_integration.py

Elsewhere these tests skip without verl.
"""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("ICPO_REQUIRE_VERL") == "1":
    import verl.trainer.ppo.core_algos as core_algos  # an ImportError here fails the run
else:
    pytest.importorskip("verl", reason="verl is not installed (see this file's docstring)")
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
from verl import DataProto

from icpo import ops
from icpo.integrations.verl import icpo_outcome_advantage, register_icpo_estimator

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_compat, for its batch helpers


def verl_batch(seed=0):
    """A verl batch: 3 prompts x 3 responses plus a prompt sampled once, shuffled the way
    balance_batch leaves it, padded to L = 6 with a response mask."""
    g = torch.Generator().manual_seed(seed)
    uids = np.array(["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"], dtype=object)
    lengths = torch.tensor([3, 6, 1, 4, 2, 5, 6, 3, 2, 4])
    perm = torch.randperm(10, generator=g)
    uids, lengths = uids[perm.numpy()], lengths[perm]
    mask = (torch.arange(6)[None] < lengths[:, None]).float()
    rewards = torch.zeros(10, 6)
    rewards[torch.arange(10), lengths - 1] = torch.randint(0, 3, (10,), generator=g).float() / 2
    old = -torch.rand(10, 6, generator=g) * 2 * mask
    return DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask,
                                        "old_log_probs": old},
                               non_tensors={"uid": uids})


def args(data):
    return dict(token_level_rewards=data.batch["token_level_rewards"],
                response_mask=data.batch["response_mask"], index=data.non_tensor_batch["uid"])


@pytest.mark.parametrize("norm", [True, False])
def test_omega_zero_equals_verl_grpo(norm):
    data = verl_batch()
    want, _ = core_algos.compute_grpo_outcome_advantage(**args(data),
                                                        norm_adv_by_std_in_grpo=norm)
    got, _ = icpo_outcome_advantage(**args(data), old_log_probs=data.batch["old_log_probs"],
                                    delta=0.5, omega=0.0, norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_registered_estimator_is_icpo_advantages():
    est = register_icpo_estimator(delta=0.5, tau=2.0, omega=lambda step: 0.5 + step,
                                  name="icpo_test")
    assert core_algos.get_adv_estimator_fn("icpo_test") is est
    data = verl_batch(seed=1)
    got, _ = est(**args(data), old_log_probs=data.batch["old_log_probs"], config=None)
    # The same batch by hand: groups made contiguous, confidence = masked mean log-prob.
    uids, mask = data.non_tensor_batch["uid"], data.batch["response_mask"]
    order = np.argsort(uids, kind="stable")
    conf = (data.batch["old_log_probs"] * mask).sum(-1) / mask.sum(-1)
    rewards = data.batch["token_level_rewards"].sum(-1)
    multi = [i for i in order if (uids == uids[i]).sum() > 1]  # the groups of three
    want = ops.icpo_advantages(conf[multi], rewards[multi], 3, delta=0.5, tau=2.0, omega=0.5,
                               unbiased=True, eps=1e-6)
    torch.testing.assert_close(got[multi, 0], want.advantages, rtol=1e-5, atol=1e-6)
    assert want.scores.abs().sum() > 0
    lone = int(np.flatnonzero(uids == "d")[0])  # verl's group of one: R / (1 + eps)
    assert got[lone, 0].item() == pytest.approx(rewards[lone].item() / (1 + 1e-6))
    with pytest.raises(ValueError, match="old_log_probs"):
        est(**args(data), config=None)
    # verl's AlgoConfig carries norm_adv_by_std_in_grpo through to the estimator.
    from verl.trainer.config import AlgoConfig

    centred, _ = est(**args(data), old_log_probs=data.batch["old_log_probs"],
                     config=AlgoConfig(norm_adv_by_std_in_grpo=False))
    plain, _ = icpo_outcome_advantage(**args(data), old_log_probs=data.batch["old_log_probs"],
                                      delta=0.5, omega=1.5, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(centred, plain)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_compat_verl_loss_is_verls_own(mode):
    """algorithm.compat=verl: icpo's mini-batch loss, over icpo's own micro-batches, equals
    verl's compute_policy_loss_vanilla (dual-clip) + low_var_kl + entropy through agg_loss,
    run by verl on its micro-batches with the mini-batch totals (global_batch_info)."""
    from omegaconf import OmegaConf
    from test_compat import batch, icpo_loss

    from icpo.config import load_config

    L = 12
    cfg = load_config(None, ["algorithm.compat=verl", f"actor.loss_agg_mode={mode}",
                             "actor.entropy_coef=0.01", "actor.kl_coef=0.001"])
    packed, p = batch([3, 12, 1, 7, 5, 9], seed=4)
    p["adv"][1] = -2.0
    p["logp"][1, :12] = p["old"][1, :12] + 1.5  # ratio e^1.5 > ... and dual-clip active at A<0
    packed["logp"][3:15] = p["logp"][1, :12]
    info = dict(dp_size=1, batch_num_tokens=int(p["mask"].sum()), global_batch_size=6,
                loss_scale_factor=L)
    vcfg = OmegaConf.create(dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2,
                                 clip_ratio_c=3.0, global_batch_info=info))
    want = 0.0
    for idx in ([0, 1, 2], [3, 4, 5]):  # verl's micro-batches
        m = p["mask"][idx]
        adv = p["adv"][idx, None] * m
        pg, _ = core_algos.compute_policy_loss_vanilla(p["old"][idx], p["logp"][idx], adv, m,
                                                       loss_agg_mode=mode, config=vcfg)
        kl = core_algos.kl_penalty(p["logp"][idx], p["ref"][idx], "low_var_kl")
        want = (want + pg + 0.001 * core_algos.agg_loss(kl, m, mode, **info)
                - 0.01 * core_algos.agg_loss(p["ent"][idx], m, mode, **info))
    got = icpo_loss(cfg, packed, [[0, 1], [2], [3, 4, 5]])
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
