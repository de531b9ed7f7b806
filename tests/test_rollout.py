"""icpo.rollout: the HF generate engine on a tiny random Qwen2, and the vLLM engine's pure
helpers and lifecycle with stand-ins shaped like vLLM 0.32's objects (the real engine:
tests/test_vllm_engine.py, tier ``-m vllm``)."""

import importlib.util
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
import transformers

from icpo.rollout import (
    HFRolloutEngine,
    RolloutBatch,
    SamplingParams,
    check_engine_available,
    make_rollout_engine,
    resolve_special_ids,
    truncate_at_eos,
    unwrap_model,
    vllm_engine,
)
from icpo.rollout.base import iter_full_parameters
from icpo.rollout.vllm_engine import (
    VLLMRolloutEngine,
    build_requests,
    map_weight_name,
    parse_outputs,
)

EOS = [61, 62, 63]
PAD = 0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [3, 4, 5, 6, 7]]


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=64)
    return transformers.Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="module")
def model():
    return tiny_qwen2()


def engine(model, **kw):
    kw.setdefault("pad_token_id", PAD)
    kw.setdefault("eos_token_id", EOS)
    return HFRolloutEngine(model, **kw)


# ---------------------------------------------------------------- HF engine

def test_groups_consecutive_finish_reasons_and_cap(model):
    batch = engine(model).generate(PROMPTS, SamplingParams(n=4, max_new_tokens=16, seed=1))
    assert len(batch) == 12
    assert batch.prompt_ids == [p for p in PROMPTS for _ in range(4)]
    for resp, reason in zip(batch.response_ids, batch.finish_reasons):
        assert 1 <= len(resp) <= 16
        assert not set(resp[:-1]) & set(EOS)
        if reason == "stop":
            assert resp[-1] in EOS
        else:
            assert reason == "length" and len(resp) == 16 and resp[-1] not in EOS
    assert set(batch.finish_reasons) == {"stop", "length"}
    groups = [batch.response_ids[4 * j:4 * j + 4] for j in range(3)]
    assert all(len({tuple(r) for r in g}) > 1 for g in groups)


def test_response_cut_after_first_eos_which_is_kept(model):
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    free = engine(model, eos_token_id=[63]).generate([PROMPTS[0]], greedy)
    tokens = free.response_ids[0]
    assert free.finish_reasons == ["length"] and 63 not in tokens
    k = 3
    eos = tokens[k]
    first = tokens.index(eos)
    cut = engine(model, eos_token_id=[eos]).generate([PROMPTS[0]], greedy)
    assert cut.response_ids == [tokens[:first + 1]] and cut.finish_reasons == ["stop"]
    # pad == eos (common for chat models): the padding after EOS must not leak in either
    same = engine(model, eos_token_id=[eos], pad_token_id=eos).generate([PROMPTS[0]], greedy)
    assert same.response_ids == cut.response_ids


def test_length_cap(model):
    batch = engine(model, eos_token_id=[63]).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=3,
                                                                              seed=0))
    assert all(len(r) <= 3 for r in batch.response_ids)
    assert all(len(r) == 3 for r, f in zip(batch.response_ids, batch.finish_reasons)
               if f == "length")


def test_seeded_sampling_is_deterministic_and_leaves_global_rng(model):
    eng = engine(model)
    params = SamplingParams(n=3, max_new_tokens=10, seed=7)
    state = torch.get_rng_state()
    a = eng.generate(PROMPTS, params)
    assert torch.equal(torch.get_rng_state(), state)
    b = eng.generate(PROMPTS, params)
    c = eng.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=10, seed=8))
    assert a.response_ids == b.response_ids and a.finish_reasons == b.finish_reasons
    assert a.response_ids != c.response_ids
    torch.manual_seed(5)
    d = eng.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=10))
    torch.manual_seed(5)
    again = eng.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=10))
    assert again.response_ids == d.response_ids


def test_ragged_prompts_greedy_batch_equals_alone(model):
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
    batched = engine(model).generate(PROMPTS, greedy)
    chunked = engine(model, batch_size=2).generate(PROMPTS, greedy)
    alone = [engine(model).generate([p], greedy) for p in PROMPTS]
    expected = [r for one in alone for r in one.response_ids]
    assert batched.response_ids == expected and chunked.response_ids == expected
    assert all(r[0] == r[1] for r in zip(expected[::2], expected[1::2]))


def test_train_mode_restored(model, monkeypatch):
    eng, params = engine(model), SamplingParams(n=1, max_new_tokens=2, seed=0)
    model.train()
    eng.generate(PROMPTS, params)
    assert model.training
    model.eval()
    eng.generate(PROMPTS, params)
    assert not model.training
    model.train()

    def boom(*args, **kw):
        assert not model.training  # generation runs in eval mode
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        eng.generate(PROMPTS, params)
    assert model.training


def test_checkpoint_generation_config_does_not_leak(model):
    eng = engine(model)
    sampled, greedy = (SamplingParams(n=2, max_new_tokens=8, seed=3),
                       SamplingParams(n=1, temperature=0.0, max_new_tokens=8))
    before = eng.generate(PROMPTS, sampled), eng.generate(PROMPTS, greedy)
    saved = model.generation_config
    model.generation_config = transformers.GenerationConfig(
        repetition_penalty=5.0, top_k=2, top_p=0.1, temperature=0.3, do_sample=True)
    try:
        after = eng.generate(PROMPTS, sampled), eng.generate(PROMPTS, greedy)
    finally:
        model.generation_config = saved
    assert [b.response_ids for b in before] == [a.response_ids for a in after]


def test_zero3_gathers_parameters(model, monkeypatch):
    entered = []

    class Gathered:
        def __init__(self, params, modifier_rank=None):
            entered.append((len(params), modifier_rank))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = ModuleType("deepspeed")
    fake.zero = SimpleNamespace(GatheredParameters=Gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=4)
    out = engine(model, zero_stage=3).generate(PROMPTS, greedy)
    assert entered == [(len(list(model.parameters())), None)]
    assert out.response_ids == engine(model).generate(PROMPTS, greedy).response_ids


def test_wrapped_model_and_special_ids(model):
    wrapper = type("DeepSpeedEngine", (torch.nn.Module,), {})()
    wrapper.module = model
    assert unwrap_model(wrapper) is model
    assert HFRolloutEngine(wrapper, pad_token_id=PAD, eos_token_id=EOS).model is model
    tok = SimpleNamespace(eos_token_id=5, pad_token_id=None)
    holder = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[5, 7]))
    assert resolve_special_ids(holder, tok) == (5, [5, 7])
    assert resolve_special_ids(holder, tok, pad_token_id=2, eos_token_id=9) == (2, [9])
    with pytest.raises(ValueError, match="EOS"):
        resolve_special_ids(SimpleNamespace(), None)


@pytest.mark.parametrize("prompts, match", [([], "at least one"), ([[1], []], r"prompt_ids\[1\]"),
                                            ([[1, 64]], "invalid token"), ([[1, -1]], "invalid")])
def test_bad_prompts(model, prompts, match):
    with pytest.raises(ValueError, match=match):
        engine(model).generate(prompts, SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("kw, match", [(dict(n=0), "n"), (dict(temperature=-1.0), "temperature"),
                                       (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
                                       (dict(max_new_tokens=0), "max_new_tokens"),
                                       (dict(seed=-3), "seed")])
def test_bad_sampling_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_sampling_params_from_config_and_batch_checks():
    cfg = SimpleNamespace(n=5, temperature=1.0, top_p=0.9, top_k=7, max_response_length=64,
                          val_n=2, val_temperature=0.5)
    assert SamplingParams.from_config(cfg, seed=3) == SamplingParams(5, 1.0, 0.9, 7, 64, 3)
    # Held-out evaluation samples the whole distribution: no top-p / top-k of training's.
    assert (SamplingParams.from_config(cfg, validation=True, seed=4)
            == SamplingParams(2, 0.5, 1.0, -1, 64, 4))
    with pytest.raises(ValueError, match="finish_reasons"):
        RolloutBatch([[1]], [[2]], ["abort"])
    with pytest.raises(ValueError, match="equal lengths"):
        RolloutBatch([[1]], [[2], [3]], ["stop"])
    with pytest.raises(ValueError, match="equal lengths"):
        RolloutBatch([[1]], [[2]], ["stop"], records=["a", "b"])


def test_rollout_batch_select_carries_every_per_sample_field():
    batch = RolloutBatch([[1], [2], [3]], [[4], [5, 6], [7]], ["stop", "length", "stop"],
                         records=["a", "b", "c"], extras={"seconds": 1.5})
    sub = batch.select([2, 0])
    assert (sub.prompt_ids, sub.response_ids, sub.finish_reasons, sub.records, sub.extras) == (
        [[3], [1]], [[7], [4]], ["stop", "stop"], ["c", "a"], {"seconds": 1.5})
    assert len(batch.select([])) == 0 and batch.select([]).records == []
    plain = RolloutBatch([[1]], [[2]], ["stop"]).select([0, 0])
    assert plain.records is None and plain.response_ids == [[2], [2]]
    assert truncate_at_eos([4, 9, 5, 9], [9], 8) == ([4, 9], "stop")
    assert truncate_at_eos([4, 5, 6], [9], 2) == ([4, 5], "length")


def test_make_rollout_engine(model):
    rollout = SimpleNamespace(engine="hf", hf_batch_size=3)
    eng = make_rollout_engine(rollout, model, pad_token_id=PAD, eos_token_id=EOS)
    assert isinstance(eng, HFRolloutEngine) and eng.batch_size == 3
    whole = SimpleNamespace(rollout=SimpleNamespace(engine="auto", hf_batch_size=2))
    if not torch.cuda.is_available():
        assert isinstance(make_rollout_engine(whole, model, eos_token_id=EOS), HFRolloutEngine)
        if importlib.util.find_spec("vllm") is None:
            with pytest.raises(RuntimeError, match="needs vLLM 0.32.0.*tools/vllm_cpu_env.sh"):
                make_rollout_engine(SimpleNamespace(engine="vllm"), model, eos_token_id=EOS)
            # the trainer's early check
            with pytest.raises(RuntimeError, match="needs vLLM 0.32.0"):
                check_engine_available("vllm")
    for name in ("hf", "auto"):
        check_engine_available(name)  # runs anywhere
    with pytest.raises(ValueError, match="engine"):
        make_rollout_engine(SimpleNamespace(engine="sglang"), model)


# ---------------------------------------------------------------- vLLM engine (stand-ins)

def test_build_requests():
    params = SamplingParams(n=3, temperature=0.8, top_p=0.9, top_k=-1, max_new_tokens=20, seed=10)
    prompts, kwargs = build_requests([[1, 2], [3]], params, stop_token_ids=EOS)
    assert prompts == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
    assert kwargs[0] == dict(n=3, temperature=0.8, top_p=0.9, top_k=0, max_tokens=20, seed=10,
                             stop_token_ids=EOS, detokenize=False, logprobs=0)
    assert kwargs[1]["seed"] == 13
    # vLLM gives child i of a request seed + i: every sample must get its own stream
    child_seeds = [kw["seed"] + i for kw in kwargs for i in range(kw["n"])]
    assert len(set(child_seeds)) == 6
    greedy = build_requests([[1]], SamplingParams(temperature=0.0, top_p=0.5, top_k=4))[1][0]
    assert [greedy[k] for k in ("temperature", "top_p", "top_k", "seed", "logprobs")] == [
        0.0, 1.0, 0, None, None]
    assert build_requests([[1]], SamplingParams(top_k=7))[1][0]["top_k"] == 7
    with pytest.raises(ValueError, match="empty"):
        build_requests([[]], params)


def completion(index, tokens, reason):
    return SimpleNamespace(index=index, token_ids=tuple(tokens), finish_reason=reason,
                           text="", stop_reason=None)


def request(prompt, completions):
    return SimpleNamespace(prompt_token_ids=list(prompt), outputs=completions)


def test_parse_outputs():
    outs = [request([1, 2], [completion(1, [7, 8, 9], "length"), completion(0, [5, 62], "stop")]),
            request([3], [completion(0, [4, 61, 4], "stop"), completion(1, [9], "stop")])]
    batch = parse_outputs(outs, 2, EOS, max_new_tokens=3)
    assert batch.prompt_ids == [[1, 2], [1, 2], [3], [3]]
    assert batch.response_ids == [[5, 62], [7, 8, 9], [4, 61], [9]]
    # [9] ended by a stop token of the model outside EOS: vLLM's "stop" is kept
    assert batch.finish_reasons == ["stop", "length", "stop", "stop"]
    with pytest.raises(RuntimeError, match="abort"):
        parse_outputs([request([1], [completion(0, [5], "abort")])], 1, EOS, 3)
    with pytest.raises(RuntimeError, match="expected n=2"):
        parse_outputs([request([1], [completion(0, [5], "stop")])], 2, EOS, 3)
    with pytest.raises(RuntimeError, match="max_new_tokens"):
        parse_outputs([request([1], [completion(0, [5, 6, 7, 8], "length")])], 1, EOS, 3)


@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
    ("module.model.norm.weight", "model.norm.weight"),
    ("module._orig_mod.lm_head.weight", "lm_head.weight"),
    ("model.layers.1._checkpoint_wrapped_module.mlp.up_proj.weight",
     "model.layers.1.mlp.up_proj.weight"),
    ("model._orig_mod.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
     "model.layers.0.self_attn.q_proj.weight"),
    ("module.base_model.model.model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head.weight"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
    ("base_model.model.lm_head.original_module.weight", None),
])
def test_map_weight_name(name, expected):
    assert map_weight_name(name) == expected


class FakeLLM:
    """Records calls like vllm.LLM's; generates by running the HF model greedily and holds a
    second model standing in for vLLM's copy of the weights."""

    def __init__(self, hf_model, engine_model):
        self.hf, self.model, self.calls = hf_model, engine_model, []

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        eng = HFRolloutEngine(self.hf, pad_token_id=PAD, eos_token_id=EOS)
        outs = []
        for prompt, sp in zip(prompts, sampling_params):
            got = eng.generate([prompt["prompt_token_ids"]],
                               SamplingParams(n=sp["n"], temperature=0.0,
                                              max_new_tokens=sp["max_tokens"]))
            outs.append(request(prompt["prompt_token_ids"], [
                completion(i, r, f) for i, (r, f) in
                reversed(list(enumerate(zip(got.response_ids, got.finish_reasons))))]))
        return outs

    def collective_rpc(self, method, kwargs=None):
        # worker-side helpers: run on the real engine (tests/test_vllm_engine.py)
        if callable(method):
            self.calls.append(method.__name__)
            return [None]
        assert method == "reload_weights" and kwargs["is_checkpoint_format"] is True
        self.calls.append(method)
        params = dict(self.model.named_parameters())
        for name, tensor in kwargs["weights_iterator"]:  # vLLM's model.load_weights, by HF names
            params[name].data.copy_(tensor)
        return [None]

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")
        return True


def test_vllm_engine_lifecycle_with_stand_in(model, monkeypatch):
    monkeypatch.setattr(vllm_engine, "_vllm_sampling_params", lambda kw: kw)
    trainer_model, engine_copy = tiny_qwen2(seed=1), tiny_qwen2(seed=2)
    fake = FakeLLM(model, engine_copy)
    eng = VLLMRolloutEngine(None, eos_token_ids=EOS, llm=fake, sleep_level=2)
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    batch = eng.generate(PROMPTS, greedy)
    assert batch.response_ids == engine(model).generate(PROMPTS, greedy).response_ids
    eng.sleep()
    eng.sleep()
    wrapped = type("DeepSpeedEngine", (torch.nn.Module,), {})()
    wrapped.module = trainer_model
    eng.load_weights((f"module.{n}", t) for n, t in iter_full_parameters(wrapped))
    for name, param in trainer_model.state_dict().items():
        assert torch.equal(engine_copy.state_dict()[name], param), name
    eng.generate(PROMPTS, greedy)
    assert fake.calls == [("generate", 3), ("sleep", 2), ("wake_up", ("weights",)),
                          "reload_weights", "_repack_tied_lm_head", "reset_prefix_cache",
                          ("wake_up", ("kv_cache",)), ("generate", 3)]
    quiet = FakeLLM(model, engine_copy)
    no_sleep = VLLMRolloutEngine(None, eos_token_ids=EOS, llm=quiet, enable_sleep_mode=False)
    no_sleep.sleep()
    no_sleep.wake_up()
    assert quiet.calls == []
    with pytest.raises(ValueError, match="eos_token_ids"):
        VLLMRolloutEngine(None, eos_token_ids=[], llm=fake)


def test_sync_from_pushes_weights_only_to_an_engine_with_its_own(model, monkeypatch):
    """What the trainer calls after every update: the HF engine samples from the trained module
    and is sent nothing; the vLLM engine gets every full parameter, wrappers looked through."""
    hf = engine(model)
    monkeypatch.setattr(hf, "load_weights", lambda tensors: pytest.fail("HF engine sent weights"))
    hf.sync_from(model)
    trainer_model, engine_copy = tiny_qwen2(seed=1), tiny_qwen2(seed=2)
    fake = FakeLLM(model, engine_copy)
    eng = VLLMRolloutEngine(None, eos_token_ids=EOS, llm=fake, enable_sleep_mode=False)
    wrapped = type("DeepSpeedEngine", (torch.nn.Module,), {})()
    wrapped.module = trainer_model
    eng.sync_from(wrapped)
    for name, param in trainer_model.state_dict().items():
        assert torch.equal(engine_copy.state_dict()[name], param), name
    assert fake.calls == ["reload_weights", "_repack_tied_lm_head", "reset_prefix_cache"]
    seen = []  # another reading of the weights (e.g. merged LoRA) goes in through `parameters`
    eng.sync_from(wrapped, 3, parameters=lambda m, z: seen.append((m, z)) or [])
    assert seen == [(wrapped, 3)]


def test_vllm_engine_without_vllm_installed(monkeypatch):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored after the test
    with pytest.raises(ImportError, match="needs vLLM 0.32.0"):
        VLLMRolloutEngine("some/model", eos_token_ids=EOS)


# ---------------------------------------------------------------- our decoder vs generate

def test_decoder_greedy_equals_generate(model):
    assert engine(model).decoder == "icpo"
    greedy = SamplingParams(n=3, temperature=0.0, max_new_tokens=12)
    ours = engine(model, decoder="icpo").generate(PROMPTS, greedy)
    theirs = engine(model, decoder="generate").generate(PROMPTS, greedy)
    assert ours.response_ids == theirs.response_ids
    assert ours.finish_reasons == theirs.finish_reasons
    assert set(ours.finish_reasons) == {"stop", "length"}  # rows leave the batch mid-way


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (-1, 0.6), (7, 0.9)])
def test_sample_next_matches_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from icpo.rollout.hf import sample_next

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    expected = TemperatureLogitsWarper(0.7)(None, logits.clone())
    if top_k > 0:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    support = torch.isfinite(expected)
    draws = torch.stack([sample_next(logits, params) for _ in range(3000)], dim=1)  # [6, 3000]
    for row in range(6):
        drawn = torch.bincount(draws[row], minlength=50)
        assert not drawn[~support[row]].any(), "a token outside top-k/top-p was drawn"
        freq = drawn.double() / drawn.sum()
        tv = 0.5 * (freq - expected[row].softmax(-1).double()).abs().sum()
        assert tv < 0.06, f"row {row}: total variation {tv:.3f} from the warpers' distribution"


def test_decoder_first_token_distribution_matches_model(model):
    """4000 seeded samples of the first response token follow softmax(logits / T)."""
    params = SamplingParams(n=4000, temperature=1.5, top_k=6, max_new_tokens=1, seed=0)
    batch = engine(model, decoder="icpo", eos_token_id=[63]).generate([PROMPTS[1]], params)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[1]])).logits[0, -1] / 1.5
    kth = torch.topk(logits, 6).values[-1]
    probs = logits.masked_fill(logits < kth, float("-inf")).softmax(-1).double()
    freq = torch.bincount(torch.tensor([r[0] for r in batch.response_ids]), minlength=64).double()
    assert not freq[probs == 0].any()
    assert 0.5 * (freq / freq.sum() - probs).abs().sum() < 0.05


def test_sliding_window_models_use_generate():
    from icpo.models.loading import kv_cache_shareable

    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=64, use_sliding_window=True,
                                   sliding_window=4, max_window_layers=0)
    assert not kv_cache_shareable(cfg)
    windowed = transformers.Qwen2ForCausalLM(cfg)
    assert engine(windowed).decoder == "generate"
    with pytest.raises(ValueError, match="decoder='icpo'"):
        engine(windowed, decoder="icpo")
    with pytest.raises(ValueError, match="decoder must be"):
        engine(windowed, decoder="vllm")
    out = engine(windowed).generate(PROMPTS, SamplingParams(n=2, max_new_tokens=6, seed=0))
    assert len(out) == 6


def test_decoder_greedy_equals_generate_on_the_bundled_model():
    """The trained tiny model is sensitive to positions and masks (a random one is not)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icpo.data.templates import build_prompt
    from icpo.models import resolve_model_path
    from icpo.tasks.arithmetic import make_records

    path = resolve_model_path("icpo/tiny")
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompts = [tok(build_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
               for r in make_records("val", 6)]
    assert len({len(p) for p in prompts}) > 1  # ragged prompts
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=48)
    ours = HFRolloutEngine(lm, tok, decoder="icpo").generate(prompts, greedy)
    theirs = HFRolloutEngine(lm, tok, decoder="generate").generate(prompts, greedy)
    assert ours.response_ids == theirs.response_ids
    assert len({len(r) for r in ours.response_ids}) > 1  # rows finished at different steps
