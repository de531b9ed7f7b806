"""icpo.integrations.trl: ICPOTrainer inside TRL 1.16 on the bundled tiny model (CPU).

omega = 0 gives exactly TRL's GRPO advantages and loss on the same batch; omega > 0 gives
icpo.ops.icpo_advantages of TRL's rewards and of confidences recomputed here with TRL's own
log-prob path; a short run raises the reward; two torchrun processes gather then slice. Also:
``algorithm.compat: trl`` losses equal ``GRPOTrainer.compute_loss`` (TRL's own code).
"""

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'icpo[trl]')")
if trl.__version__ != "1.16.0":
    pytest.skip(f"icpo.integrations.trl is pinned to trl 1.16.0, found {trl.__version__}",
                allow_module_level=True)

from datasets import Dataset  # noqa: E402  (after the version skip)
from transformers import AutoTokenizer  # noqa: E402  (after the version skip)
from trl import GRPOConfig, GRPOTrainer  # noqa: E402  (after the version skip)

from icpo import ops  # noqa: E402  (after the version skip)
from icpo.data.templates import build_prompt  # noqa: E402  (after the version skip)
from icpo.integrations.trl import ICPOConfig, ICPOTrainer  # noqa: E402  (after the version skip)
from icpo.models import resolve_model_path  # noqa: E402  (after the version skip)
from icpo.rewards.verifiable import compute_score  # noqa: E402  (after the version skip)
from icpo.tasks.arithmetic import make_records  # noqa: E402  (after the version skip)

MODEL = resolve_model_path("icpo/tiny")
G = 4


def verifiable(prompts, completions, ground_truth, data_source, **_):
    """icpo's arithmetic reward in TRL's reward-function signature."""
    return [compute_score(s, c, gt)["score"]
            for s, c, gt in zip(data_source, completions, ground_truth)]


def dataset(n, seed=0):
    tok = AutoTokenizer.from_pretrained(MODEL, padding_side="left")
    recs = make_records("train", n, seed=seed)
    return tok, Dataset.from_dict({
        "prompt": [build_prompt(tok, r["prompt"], "r1") for r in recs],
        "ground_truth": [r["reward_model"]["ground_truth"] for r in recs],
        "data_source": [r["data_source"] for r in recs]})


def config(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                model_init_kwargs={"dtype": torch.float32}, per_device_train_batch_size=4 * G,
                gradient_accumulation_steps=1, num_generations=G, max_completion_length=24,
                temperature=1.0, top_k=0, top_p=1.0, logging_strategy="no", save_strategy="no",
                disable_tqdm=True, seed=0, use_vllm=False, dataloader_num_workers=0)
    base.update(kw)
    return cls(**base)


def trainer(cls, args, tmp_path):
    tok, data = dataset(8)
    t = cls(model=MODEL, reward_funcs=verifiable, args=args, train_dataset=data,
            processing_class=tok)
    t.model.train()
    t.current_gradient_accumulation_steps = 1  # set by the training loop; needed by the loss
    return t, [row for row in data.select(range(4)) for _ in range(G)]


def scored(t, rows):
    torch.manual_seed(123)
    return t._generate_and_score_completions(rows)


def trl_confidence(t, out) -> torch.Tensor:
    """Each completion's mean token log-prob, recomputed independently of icpo's kernels with
    TRL's own (fused-head) log-prob path."""
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        logp, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, attn,
                                                          out["completion_ids"].size(1))
    mask = out["completion_mask"].float()
    return (logp * mask).sum(1) / mask.sum(1)


def test_omega_zero_is_trl_grpo(tmp_path, one_thread):
    grpo, rows = trainer(GRPOTrainer, config(GRPOConfig, tmp_path), tmp_path)
    icpo, _ = trainer(ICPOTrainer, config(ICPOConfig, tmp_path, omega_max=0.0), tmp_path)
    want, got = scored(grpo, rows), scored(icpo, rows)
    assert torch.equal(want["completion_ids"], got["completion_ids"])  # the same samples
    assert want["advantages"].abs().sum() > 0  # rewards differ inside some group
    # Equal up to float32 rounding: icpo accumulates group mean / std in float64 (so a group of
    # equal rewards gets exactly 0, docs/compat.md), TRL in float32.
    torch.testing.assert_close(got["advantages"], want["advantages"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(icpo.compute_loss(icpo.model, got),
                               grpo.compute_loss(grpo.model, want), rtol=1e-6, atol=1e-7)


def test_omega_positive_is_icpo_advantages(tmp_path, one_thread):
    args = config(ICPOConfig, tmp_path, omega_schedule="constant", omega_max=1.0,
                  icpo_delta=0.5, icpo_tau=2.0)
    t, rows = trainer(ICPOTrainer, args, tmp_path)
    t.state.max_steps = 10
    out = scored(t, rows)
    confidence = trl_confidence(t, out)
    rewards = t._rewards_all.sum(1)
    want = ops.icpo_advantages(confidence, rewards, G, delta=0.5, tau=2.0, omega=1.0,
                               unbiased=True, eps=1e-4)
    assert want.scores.abs().sum() > 0
    torch.testing.assert_close(out["advantages"], want.advantages, rtol=1e-5, atol=1e-5)
    grpo = ops.grpo_advantages(rewards, G, unbiased=True, eps=1e-4)
    assert not torch.allclose(out["advantages"], grpo)  # the bonus changed something


def test_config_rejects_bad_icpo_fields(tmp_path):
    with pytest.raises(ValueError, match="omega_schedule"):
        config(ICPOConfig, tmp_path, omega_schedule="cosine")
    with pytest.raises(ValueError, match="icpo_tau"):
        config(ICPOConfig, tmp_path, icpo_tau=0.0)


@pytest.mark.slow  # ~14 s alone, over 20 s on a loaded machine
def test_short_run_learns(tmp_path, one_thread):
    """20 steps of ICPOTrainer.train() on a dense reward (shorter completions score higher): the
    reward of the last five steps is well above that of the first five."""
    def brevity(completion_ids, **_):
        return [1.0 - len(c) / 32 for c in completion_ids]

    steps, prompts, gen = 20, 2, 8
    args = config(ICPOConfig, tmp_path, per_device_train_batch_size=prompts * gen,
                  num_generations=gen, learning_rate=1e-3, max_steps=steps,
                  max_completion_length=32,
                  logging_strategy="steps", logging_steps=1, lr_scheduler_type="constant",
                  warmup_steps=0, beta=0.0, icpo_delta=0.5)
    tok, data = dataset(prompts * steps, seed=1)
    t = ICPOTrainer(model=MODEL, reward_funcs=brevity, args=args, train_dataset=data,
                    processing_class=tok)
    t.train()
    logs = [h for h in t.state.log_history if "reward" in h]
    assert len(logs) == steps and max(h["icpo/omega"] for h in logs) > 0.5
    first = sum(h["reward"] for h in logs[:5]) / 5
    last = sum(h["reward"] for h in logs[-5:]) / 5
    assert last > first + 0.2, (first, last)


@pytest.mark.slow
def test_two_processes(tmp_path):
    """Under torchrun with 2 CPU processes: ICPO's advantages come from the batch gathered over
    both processes (scores and std over whole groups), each process keeping its own slice; with
    omega = 0 they are TRL's GRPO advantages."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from launch import clean_env, free_port

    port = free_port()
    here = Path(__file__).resolve().parent
    out = tmp_path / "runs.json"
    env = clean_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), str(here / "trl_two_process_worker.py"), str(out), str(here)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = json.loads(out.read_text())
    assert all(r["world"] == 2 for r in runs.values())
    t = lambda x: torch.tensor(x)  # noqa: E731  (a one-line helper)
    torch.testing.assert_close(t(runs["icpo0"]["advantages"]), t(runs["grpo"]["advantages"]),
                               rtol=1e-6, atol=1e-7)  # float32 rounding, as above
    r1 = runs["icpo1"]
    want = ops.icpo_advantages(t(r1["confidence"]), t(r1["rewards"]), G, delta=0.5, tau=2.0,
                               omega=1.0, unbiased=True, eps=1e-4)
    assert len(r1["advantages"]) == 4 * G and want.scores.abs().sum() > 0
    torch.testing.assert_close(t(r1["advantages"]), want.advantages, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(t(r1["advantages"]), t(runs["grpo"]["advantages"]))
    # scale_rewards="batch": the std is over both processes' responses, not each one's own.
    rb = runs["icpo1_batch"]
    final = ops.icpo_advantages(t(rb["confidence"]), t(rb["rewards"]), G, delta=0.5, tau=2.0,
                                omega=1.0, scale=False)
    want = final.advantages / (final.rewards.std() + 1e-4)
    torch.testing.assert_close(t(rb["advantages"]), want, rtol=1e-5, atol=1e-5)
    local = final.advantages[:2 * G] / (final.rewards[:2 * G].std() + 1e-4)
    assert not torch.allclose(t(rb["advantages"][:2 * G]), local)


def test_compat_trl_loss_is_trls_own(tmp_path, one_thread):
    """algorithm.compat=trl: for each loss type and importance-sampling level, with the entropy
    bonus, icpo's grpo_loss summed over TRL's two accumulation micro-batches equals the sum of
    GRPOTrainer.compute_loss over them (TRL's own code, on a real generation batch)."""
    from icpo.algorithms import grpo_loss
    from icpo.config import load_config

    args = config(GRPOConfig, tmp_path, per_device_train_batch_size=2 * G,
                  gradient_accumulation_steps=2, steps_per_generation=2, entropy_coef=0.01)
    t, rows = trainer(GRPOTrainer, args, tmp_path)
    t.current_gradient_accumulation_steps = 2
    batch = scored(t, rows)  # 16 completions: TRL splits them into 2 micro-batches of 8
    mask = batch["completion_mask"]
    C = mask.size(1)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], mask], 1)
    with torch.no_grad():
        logp, ent, _ = t._get_per_token_logps_and_entropies(t.model, ids, attn, C,
                                                            compute_entropy=True)
    old = (logp + (torch.rand(logp.shape, generator=g) - 0.5) * 0.6) * mask
    adv = torch.randn(mask.size(0), generator=g)
    micro = [slice(0, 2 * G), slice(2 * G, 4 * G)]
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for level in ("token", "sequence"):
            t.loss_type, t.importance_sampling_level = loss_type, level
            want = 0.0
            with torch.no_grad():
                for s in micro:
                    inp = {k: batch[k][s] for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                    "completion_mask")}
                    inp.update(advantages=adv[s], old_per_token_logps=old[s],
                               num_items_in_batch=batch["num_items_in_batch"])
                    want = want + t.compute_loss(t.model, inp)
            cfg = load_config(None, ["algorithm.compat=trl", f"actor.loss_agg_mode={loss_type}",
                                     f"actor.importance_sampling_level={level}",
                                     "actor.entropy_coef=0.01"])
            got = 0.0
            for s in micro:
                m = mask[s].bool()
                lengths = m.sum(1)
                cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
                loss, _ = grpo_loss(logp[s][m], old[s][m], None, ent[s][m],
                                    torch.repeat_interleave(adv[s], lengths), cu, cfg.actor,
                                    args.max_completion_length,
                                    global_tokens=int(mask.sum()), global_seqs=mask.size(0),
                                    num_micro_batches=len(micro))
                got = got + loss
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                                       msg=f"{loss_type} / {level}")


def test_confidence_reuses_trl_old_logps(tmp_path, one_thread):
    """With num_iterations > 1 TRL computes the old log-probs itself: the confidence is their
    masked mean (no extra forward)."""
    args = config(ICPOConfig, tmp_path, num_iterations=2, omega_schedule="constant",
                  omega_max=1.0, icpo_delta=0.5)
    t, rows = trainer(ICPOTrainer, args, tmp_path)
    t.state.max_steps = 10
    t._sampling_logps = None  # must not be called
    out = scored(t, rows)
    mask = out["completion_mask"].float()
    confidence = (out["old_per_token_logps"] * mask).sum(1) / mask.sum(1)
    want = ops.icpo_advantages(confidence, t._rewards_all.sum(1), G, delta=0.5, tau=2.0,
                               omega=1.0, unbiased=True, eps=1e-4)
    torch.testing.assert_close(out["advantages"], want.advantages, rtol=1e-5, atol=1e-5)


def test_peft_config_goes_to_trl_unchanged(tmp_path, monkeypatch, one_thread):
    """ICPOTrainer hands ``peft_config`` to GRPOTrainer as given; TRL wraps the model in PEFT
    (only the adapters train, TRL's reference is the base with them off) and ICPO's advantages
    are computed on that model. icpo's own trainer has model.lora_rank (docs/lora.md)."""
    from peft import LoraConfig, PeftModel

    received = {}
    real_init = GRPOTrainer.__init__

    def spy(self, *args, **kwargs):
        received.update(kwargs)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "__init__", spy)
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    args = config(ICPOConfig, tmp_path, omega_schedule="constant", omega_max=1.0,
                  icpo_delta=0.5, beta=0.01)
    tok, data = dataset(8)
    t = ICPOTrainer(model=MODEL, reward_funcs=verifiable, args=args, train_dataset=data,
                    processing_class=tok, peft_config=peft_config)
    assert received["peft_config"] is peft_config
    model = t.accelerator.unwrap_model(t.model)
    assert isinstance(model, PeftModel) and t.ref_model is None  # TRL: adapters off for the KL
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    t.model.train()
    t.current_gradient_accumulation_steps = 1
    t.state.max_steps = 10
    out = scored(t, [row for row in data.select(range(4)) for _ in range(G)])
    want = ops.icpo_advantages(trl_confidence(t, out), t._rewards_all.sum(1), G, delta=0.5,
                               tau=2.0, omega=1.0, unbiased=True, eps=1e-4)
    torch.testing.assert_close(out["advantages"], want.advantages, rtol=1e-5, atol=1e-5)
