"""The trainer's scoring path through ``icpo.ops.linear_token_logprobs`` (``actor.fused_linear``).

Fused and unfused scoring give the same log-probs, entropies and gradients for tied, untied and
biased heads; both equal what the model's own forward gives (soft-capping and logit scales
included); heads the op cannot compute fall back under "auto" (a note, once) and are refused
under "on"; one training step gives the same metrics and gradients either way. The ZeRO-3 check
(weight partitioned, two processes) is ``test_zero3_fused_head_matches_zero0``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import clean_env, free_port

from icpo import ops
from icpo.errors import UserError
from icpo.trainer import scoring
from icpo.trainer.batching import pack_samples

REPO = Path(__file__).resolve().parents[1]
VOCAB = 301  # prime: not a multiple of any chunk
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _tiny(kind: str) -> torch.nn.Module:
    """A random 2-layer causal LM: "tied" (Qwen2), "untied" (Llama), "bias" (Qwen2 whose
    untied head is an nn.Linear with a bias), "softcap" (Gemma 2), "granite" (logits divided
    by logits_scaling), "cohere" (logits times logit_scale)."""
    import transformers as tf

    small = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    if kind in ("tied", "bias"):
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**small, tie_word_embeddings=kind == "tied"))
        if kind == "bias":
            model.lm_head = torch.nn.Linear(48, VOCAB, bias=True)
            torch.nn.init.normal_(model.lm_head.bias, std=0.5)
    elif kind == "untied":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**small, tie_word_embeddings=False))
    elif kind == "softcap":
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**small, head_dim=24,
                                                     final_logit_softcapping=0.5))
    elif kind == "granite":
        model = tf.GraniteForCausalLM(tf.GraniteConfig(**small, logits_scaling=4.0))
    elif kind == "cohere":
        model = tf.CohereForCausalLM(tf.CohereConfig(**small, logit_scale=0.25))
    else:
        raise ValueError(kind)
    return model.float().eval()


def _batch():
    """Four responses sharing one prompt (long enough for the shared-prefix path) and one with
    its own."""
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(  # noqa: E731  (a one-line helper)
        0, VOCAB, (n,), generator=g).tolist()
    shared = ids(100)
    prompts = [shared] * 4 + [ids(7)]
    responses = [ids(n) for n in (5, 9, 1, 12, 3)]
    return prompts, responses, pack_samples(prompts, responses, list(range(5)))


def _run(model, batch, mode, temperature=0.7, share_prefix=True):
    """Log-probs, entropies and every parameter's gradient of a loss using both."""
    model.zero_grad(set_to_none=True)
    logp, ent = scoring.response_logprobs(model, batch, temperature, fused_linear=mode,
                                          share_prefix=share_prefix)
    w = torch.linspace(-1.0, 1.0, logp.numel())
    (logp @ w + 0.3 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


def _own_logprobs(model, prompts, responses, temperature):
    """The same quantities from the model's own forward (its full logits), one sample at a time."""
    logps, ents = [], []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:-1]
            logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
            logps.append(logp_all.gather(1, torch.tensor(r)[:, None])[:, 0])
            ents.append(-(logp_all.exp() * logp_all).sum(-1))
    return torch.cat(logps).float(), torch.cat(ents).float()


@pytest.mark.parametrize("kind", ["tied", "untied", "bias"])
def test_fused_matches_unfused_and_the_model(kind, monkeypatch):
    model = _tiny(kind)
    prompts, responses, batch = _batch()
    assert scoring.use_fused_linear(model, "on")
    off = _run(model, batch, "off")

    def unfused(*a, **k):
        raise AssertionError("the fused path built the logits")

    calls = []
    real = ops.linear_token_logprobs
    monkeypatch.setattr(ops, "token_logprobs", unfused)
    monkeypatch.setattr(ops, "linear_token_logprobs",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    on = _run(model, batch, "on")
    auto = _run(model, batch, "auto")
    assert len(calls) == 2  # one head call per scoring call
    assert "forward" not in vars(model.get_output_embeddings())  # the head is left as it was
    for fused in (on, auto):
        torch.testing.assert_close(fused[0], off[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(fused[1], off[1], rtol=0, atol=1e-5)
        assert fused[2].keys() == off[2].keys()
        for name in off[2]:
            torch.testing.assert_close(fused[2][name], off[2][name], rtol=1e-4, atol=1e-6, msg=name)
    if kind == "bias":
        assert "lm_head.bias" in on[2] and on[2]["lm_head.bias"].abs().sum() > 0
    own_logp, own_ent = _own_logprobs(model, prompts, responses, 0.7)
    torch.testing.assert_close(on[0], own_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(on[1], own_ent, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["granite", "cohere"])
def test_scaled_logits_are_fused_at_the_scaled_temperature(kind):
    """A positive logit scale is a temperature: the op takes T / scale."""
    model = _tiny(kind)
    prompts, responses, batch = _batch()
    assert scoring.use_fused_linear(model, "on")
    on, off = _run(model, batch, "on"), _run(model, batch, "off")
    own_logp, own_ent = _own_logprobs(model, prompts, responses, 0.7)
    for got in (on, off):
        torch.testing.assert_close(got[0], own_logp, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1], own_ent, rtol=0, atol=1e-5)
    for name in off[2]:
        torch.testing.assert_close(on[2][name], off[2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_softcapping_falls_back_with_one_note_and_on_is_refused(capsys):
    model = _tiny("softcap")
    prompts, responses, batch = _batch()
    scoring._NOTED.clear()
    assert not scoring.use_fused_linear(model, "auto")
    first = capsys.readouterr().err
    assert first.count("\n") == 1 and "final_logit_softcapping=0.5" in first
    assert "actor.fused_linear=auto" in first
    logp, ent, _ = _run(model, batch, "auto")
    _run(model, batch, "auto")
    assert capsys.readouterr().err == ""  # once per run, not per call
    own_logp, own_ent = _own_logprobs(model, prompts, responses, 0.7)
    torch.testing.assert_close(logp, own_logp, rtol=0, atol=1e-5)  # the cap is applied
    torch.testing.assert_close(ent, own_ent, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match=r"actor.fused_linear=on: Gemma2ForCausalLM has logit "
                                        r"soft-capping .* set actor.fused_linear to auto or off"):
        scoring.use_fused_linear(model, "on")


class _ScaledHead(torch.nn.Linear):
    """A head that is an nn.Linear by type but computes something else."""

    def forward(self, x):
        return super().forward(x) * 2.0


def test_another_head_falls_back(capsys):
    model = _tiny("untied")
    prompts, responses, batch = _batch()
    head = _ScaledHead(48, VOCAB, bias=False)
    head.weight.data.copy_(model.lm_head.weight.data)
    model.lm_head = head
    scoring._NOTED.clear()
    logp, _, _ = _run(model, batch, "auto")
    note = capsys.readouterr().err
    assert "LlamaForCausalLM has an output head of type _ScaledHead" in note
    own_logp, _ = _own_logprobs(model, prompts, responses, 0.7)
    torch.testing.assert_close(logp, own_logp, rtol=0, atol=1e-5)  # the head's own forward ran
    with pytest.raises(UserError, match="_ScaledHead, not a plain linear layer"):
        _run(model, batch, "on")


def test_shared_prefix_and_padded_paths_agree_fused():
    """The fused head sees the same hidden states whichever way the body ran."""
    model = _tiny("tied")
    _, _, batch = _batch()
    body, _ = scoring._body_and_head(model)
    assert scoring._can_share_prefix(body)
    assert scoring._shared_prefix_hidden(body, batch) is not None
    a, b = _run(model, batch, "on", share_prefix=True), _run(model, batch, "on", share_prefix=False)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=1e-4, atol=1e-6, msg=name)


def test_config_reads_bare_on_and_off(tmp_path):
    """YAML 1.1 reads a bare ``on`` / ``off`` as a bool; the field takes them as written, and a
    saved config reads back the same."""
    from icpo.config import config_from_dict, load_config, save_config

    (tmp_path / "a.yaml").write_text("actor:\n  fused_linear: off\n")
    assert load_config(tmp_path / "a.yaml").actor.fused_linear == "off"
    cfg = config_from_dict({}, ["actor.fused_linear=on"])
    assert cfg.actor.fused_linear == "on"
    save_config(cfg, tmp_path / "b.yaml")
    assert load_config(tmp_path / "b.yaml").actor.fused_linear == "on"
    assert config_from_dict({}).actor.fused_linear == "auto"
    with pytest.raises(ValueError, match="actor.fused_linear: got 'maybe'; expected one of "
                                         "'auto', 'on', 'off'"):
        config_from_dict({}, ["actor.fused_linear=maybe"])


# ----------------------------------------------------------------------------- a training step

NONDETERMINISTIC = ("time/", "perf/")


def _train_one_step(out: Path, train_file: Path, fused: str, *overrides: str):
    """One step of examples/configs/tiny_cpu.yaml (the bundled model) on 4 prompts x G = 8:
    its logged metrics and the gradient the optimizer step saw."""
    from icpo.config import load_config
    from icpo.trainer import Trainer

    cfg = load_config(REPO / "examples" / "configs" / "tiny_cpu.yaml", [
        f"data.train_files=[{train_file}]", f"trainer.output_dir={out}", "trainer.total_steps=1",
        "trainer.train_batch_size=4", "trainer.eval_every=0", "trainer.progress_bar=false",
        f"actor.fused_linear={fused}", *overrides])
    trainer = Trainer(cfg)
    grads, real_step = [], trainer.models.actor.step

    def capturing_step(*a, **k):
        grads.append({n: p.grad.detach().clone()
                      for n, p in trainer.models.actor.module.named_parameters()})
        return real_step(*a, **k)

    trainer.models.actor.step = capturing_step
    (metrics,) = trainer.train()
    return {k: v for k, v in metrics.items() if not k.startswith(NONDETERMINISTIC)}, grads


@pytest.mark.parametrize("case", ["reused_forward", "separate_passes"])
def test_training_step_same_with_fused_linear_on_and_off(tmp_path, case):
    """``reused_forward``: one mini-batch in one micro-batch, so the scoring forward (with grad)
    serves the update; ``separate_passes``: two mini-batches of small micro-batches."""
    from icpo.tasks.arithmetic import make_records, write_jsonl

    train = tmp_path / "train.jsonl"
    write_jsonl(make_records("train", 8, seed=3), train)
    extra = (["actor.ppo_mini_batch_size=4", "actor.max_tokens_per_micro_batch=8192"]
             if case == "reused_forward" else
             ["actor.ppo_mini_batch_size=2", "actor.max_tokens_per_micro_batch=400"])
    m_on, g_on = _train_one_step(tmp_path / "on", train, "on", *extra)
    m_off, g_off = _train_one_step(tmp_path / "off", train, "off", *extra)
    assert m_on.keys() == m_off.keys()
    assert m_on["actor/grad_norm"] > 0
    for k in m_off:
        assert m_on[k] == pytest.approx(m_off[k], rel=1e-5, abs=1e-6), k
    assert len(g_on) == len(g_off) == (1 if case == "reused_forward" else 2)
    for a, b in zip(g_on, g_off):
        for name in b:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- ZeRO-3

@pytest.mark.slow
def test_zero3_fused_head_matches_zero0(tiny_random_model_dir, tmp_path):
    """Two processes, the fused head, the trainer's policy update on fixed samples
    (tests/_fused_zero_worker.py): at ZeRO-3, with the head's weight partitioned (its grad
    reduce-scattered), the losses and every reduced gradient equal ZeRO-0's, for a step over
    several micro-batches (unequal across ranks: padding backward passes) and for the scoring
    forward reused by the update."""
    runs = {}
    for stage in (0, 3):
        out = tmp_path / f"zero{stage}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(REPO / "tests" / "_fused_zero_worker.py"),
               str(tiny_random_model_dir), str(stage), str(out)]
        proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[stage] = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    for rank in (0, 1):
        zero0, zero3 = runs[0][rank], runs[3][rank]
        assert zero3["partitioned"] and not zero0["partitioned"]
        assert zero0["fused_calls"] > 0 and zero3["fused_calls"] > 0
        for variant in ("separate", "reused"):
            a, b = zero0["results"][variant], zero3["results"][variant]
            assert a["micro_batches"] == b["micro_batches"]
            # actor/grad_norm is this rank's norm at ZeRO-0 and the reduced one at ZeRO-3;
            # the reduced gradients themselves are compared below
            for k in ("actor/pg_loss", "actor/kl_loss", "actor/entropy_loss", "actor/kl",
                      "actor/clipfrac"):
                assert b["metrics"][k] == pytest.approx(a["metrics"][k], rel=1e-5, abs=1e-7), k
            assert a["grads"].keys() == b["grads"].keys()
            for name in a["grads"]:
                torch.testing.assert_close(b["grads"][name], a["grads"][name], rtol=1e-4,
                                           atol=1e-7, msg=f"{variant} rank {rank} {name}")
    assert runs[0][0]["results"]["separate"]["micro_batches"] != \
        runs[0][1]["results"]["separate"]["micro_batches"]
