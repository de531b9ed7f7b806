"""icpo.rewards: format/answer rewards (Eq. 10), plug-in loading, RewardFn, noise, uniform
groups."""

import threading

import pytest
import torch

import icpo.rewards.verifiable as verifiable
from icpo.config import RewardConfig
from icpo.data import PromptRecord
from icpo.rewards import (
    RewardError,
    RewardFn,
    add_reward_noise,
    answer_reward,
    compute_score,
    extract_answer,
    format_reward,
    load_reward_fn,
    num_noisy,
    uniform_group_mask,
)

# ----------------------------------------------------------------------------- format

@pytest.mark.parametrize("text, expected", [
    ("<think>2+3=5</think> <answer>5</answer>", 1.0),
    ("\n <think>\nstep\n</think>\n\n<answer> 5 </answer>\n", 1.0),
    ("<think></think><answer>5</answer>", 1.0),
    ("<answer>5</answer>", 0.0),                                          # missing think
    ("<think>x</think>", 0.0),                                            # missing answer
    ("<think>x</think> <answer>5", 0.0),                                  # unclosed
    ("<answer>5</answer> <think>x</think>", 0.0),                         # wrong order
    ("<think>x</think> <think>y</think> <answer>5</answer>", 0.0),        # duplicated think
    ("<think>x</think> <answer>5</answer><answer>6</answer>", 0.0),       # duplicated answer
    ("Sure! <think>x</think> <answer>5</answer>", 0.0),                   # text before
    ("<think>x</think> so <answer>5</answer>", 0.0),                      # text between
    ("<think>x</think> <answer>5</answer> done", 0.0),                    # text after
    ("<think>x</think> <answer>5</answer><|im_end|>", 0.0),               # special token left in
    ("<think>x <answer>5</answer></think>", 0.0),                         # nested
    ("<think>x</think> <answer>  </answer>", 0.0),                        # empty answer
    ("", 0.0),
])
def test_format_reward(text, expected):
    assert format_reward(text) == expected


def test_extract_answer():
    assert extract_answer("<think>a</think> <answer> 42 </answer>") == "42"
    assert extract_answer("<answer>1</answer> then <answer>\\frac{1}{2}</answer>") == "\\frac{1}{2}"
    assert extract_answer("The answer is 42") is None
    assert extract_answer("<answer>   </answer>") is None
    with pytest.raises(TypeError, match="text"):
        extract_answer(None)


# ----------------------------------------------------------------------------- answers

@pytest.mark.parametrize("answer, truth", [
    ("43", "43"), ("-5", "-5"), ("3.50", "3.5"), ("3.5", "3.50"), ("43.0", "43"),
    ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac{1}{2}"), ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("1/2", "\\frac12"), ("\\boxed{43}", "43"), ("$\\frac{3}{4}$", "0.75"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("x = 5", "5"), ("1,000", "1000"), ("\\pi", "\\pi"),
    ("Paris", "paris"), ("43", 43), ("-2.5", -2.5),
])
def test_equivalent_answers_score_one(answer, truth):
    assert answer_reward(answer, truth) == 1.0


@pytest.mark.parametrize("answer, truth", [
    ("44", "43"), ("-5", "5"), ("5", "-5"), ("\\frac{1}{3}", "0.5"), ("0.51", "0.5"),
    ("2", "\\sqrt{8}"), ("London", "Paris"), (None, "43"),
])
def test_wrong_answers_score_zero(answer, truth):
    assert answer_reward(answer, truth) == 0.0


@pytest.mark.parametrize("answer, truth, expected", [
    ("B", "B", 1.0), ("b", "B", 1.0), ("(B)", "B", 1.0), ("B.", "B", 1.0), ("B)", "B", 1.0),
    ("\\boxed{B}", "B", 1.0), ("\\text{(J)}", "J", 1.0), ("B", "(B)", 1.0),
    ("C", "B", 0.0), ("BC", "B", 0.0), ("B is right", "B", 0.0), ("2", "B", 0.0), ("A", "J", 0.0),
])
def test_multiple_choice_letters(answer, truth, expected):
    assert answer_reward(answer, truth) == expected


def test_list_ground_truth_accepts_any():
    assert answer_reward("7", ["6", "7"]) == 1.0 and answer_reward("8", ["6", "7"]) == 0.0


@pytest.mark.parametrize("exc", [RuntimeError("boom"), verifiable.TimeoutException("slow")])
def test_math_verify_failures_count_as_wrong(monkeypatch, exc):
    def broken(*args, **kwargs):
        raise exc
    monkeypatch.setattr(verifiable, "verify", broken)
    assert answer_reward("\\frac{1}{2}", "0.5") == 0.0


def test_answer_reward_works_off_the_main_thread():
    out = {}
    t = threading.Thread(target=lambda: out.update(
        right=answer_reward("\\frac{1}{2}", "0.5"), wrong=answer_reward("\\frac{1}{3}", "0.5")))
    t.start()
    t.join()
    assert out == {"right": 1.0, "wrong": 0.0}


def test_compute_score_weights():
    good = "<think>2+3</think> <answer>5</answer>"
    assert compute_score("gsm8k", good, "5") == {"score": 1.0, "acc": 1.0, "format": 1.0}
    assert compute_score("gsm8k", "<think>x</think> <answer>4</answer>", "5") == pytest.approx(
        {"score": 0.1, "acc": 0.0, "format": 1.0})
    assert compute_score("gsm8k", "<answer>5</answer>", "5") == pytest.approx(
        {"score": 0.9, "acc": 1.0, "format": 0.0})
    assert compute_score("gsm8k", "5", "5") == {"score": 0.0, "acc": 0.0, "format": 0.0}
    w = {"answer_weight": 0.5, "format_weight": 0.25}
    assert compute_score("gsm8k", good, "5", w)["score"] == pytest.approx(0.75)
    assert compute_score("gsm8k", "<answer>5</answer>", "5", w)["score"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- plug-ins

def length_reward(data_source, solution_str, ground_truth, extra_info=None):
    """A plug-in with verl's signature that returns a float."""
    return float(len(solution_str))


class Holder:
    @staticmethod
    def dict_reward(data_source, solution_str, ground_truth, extra_info=None):
        correct = solution_str.strip() == ground_truth
        return {"score": 2.0 if correct else -1.0, "bonus": extra_info["answer_weight"],
                "label": "text is ignored", "src": float(data_source == "toy")}


NOT_CALLABLE = 3


def test_load_reward_fn_forms(tmp_path):
    assert load_reward_fn(f"{__name__}:length_reward") is length_reward
    assert load_reward_fn(f"{__name__}.length_reward") is length_reward
    assert load_reward_fn(f"{__name__}:Holder.dict_reward") is Holder.dict_reward
    assert load_reward_fn("icpo.rewards.verifiable:compute_score") is compute_score
    f = tmp_path / "my_reward.py"
    f.write_text("def fn(data_source, solution_str, ground_truth, extra_info=None):\n"
                 "    return 0.25\n")
    assert load_reward_fn(f"{f}:fn")("d", "s", "g", None) == 0.25


@pytest.mark.parametrize("dotted, exc, fragment", [
    ("no_such_module_xyz:fn", ImportError, "no_such_module_xyz"),
    (f"{__name__}:missing_fn", AttributeError, "missing_fn"),
    (f"{__name__}:NOT_CALLABLE", TypeError, "not callable"),
    ("justaname", ValueError, "justaname"),
    ("/nonexistent/dir/r.py:fn", FileNotFoundError, "/nonexistent/dir/r.py"),
])
def test_load_reward_fn_errors_name_the_path(dotted, exc, fragment):
    with pytest.raises(exc) as e:
        load_reward_fn(dotted)
    assert fragment in str(e.value)


def _rec(gt, source="toy"):
    return PromptRecord(prompt="q", ground_truth=gt, data_source=source, extra_info={"k": 1},
                        index=0)


def test_reward_fn_default_and_group_broadcast():
    fn = RewardFn(RewardConfig(answer_weight=0.8, format_weight=0.2))
    texts = ["<think>a</think><answer>5</answer>", "<answer>5</answer>", "nothing",
             "<think>a</think><answer>B</answer>", "<think>a</think><answer>C</answer>", "(B)"]
    out = fn([_rec("5"), _rec("B")], texts)  # 2 prompts x G=3
    assert out.score.dtype == torch.float32 and out.score.shape == (6,)
    assert out.score.tolist() == pytest.approx([1.0, 0.8, 0.0, 1.0, 0.2, 0.0])
    assert out.acc.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert out.extras["format"].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def test_reward_fn_plugins_float_and_dict():
    out = RewardFn(RewardConfig(function=f"{__name__}:length_reward"))([_rec("x")] * 2, ["ab", ""])
    assert out.score.tolist() == [2.0, 0.0] and out.acc.tolist() == [1.0, 0.0] and out.extras == {}
    cfg = RewardConfig(function=f"{__name__}:Holder.dict_reward", answer_weight=0.7)
    out = RewardFn(cfg)([_rec("yes"), _rec("no", source="other")], ["yes", "maybe"])
    assert out.score.tolist() == [2.0, -1.0] and out.acc.tolist() == [1.0, 0.0]
    assert set(out.extras) == {"bonus", "src"}
    assert out.extras["bonus"].tolist() == pytest.approx([0.7, 0.7])  # config weight passed through
    assert out.extras["src"].tolist() == [1.0, 0.0]


def bad_return(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1.0} if solution_str == "dict" else float("nan")


def raises(data_source, solution_str, ground_truth, extra_info=None):
    if solution_str == "b":
        raise KeyError("oops")
    return 1.0


def test_reward_fn_rejects_bad_outputs():
    fn = RewardFn(RewardConfig(function=f"{__name__}:bad_return"))
    with pytest.raises(RewardError, match="without 'score'"):
        fn([_rec("x")], ["dict"])
    with pytest.raises(RewardError, match="finite number"):
        fn([_rec("x")], ["nan"])
    with pytest.raises(RewardError, match="raises.*sample 1"):
        RewardFn(RewardConfig(function=f"{__name__}:raises"))([_rec("x")] * 2, ["a", "b"])
    with pytest.raises(ValueError, match="records"):
        RewardFn(RewardConfig())([_rec("x")] * 2, ["a", "b", "c"])


# ----------------------------------------------------------------------- noise, uniform groups

@pytest.mark.parametrize("n, fraction", [(10, 0.4), (768 * 5, 0.4), (7, 0.5), (5, 0.0), (6, 1.0)])
def test_noise_exact_count_and_magnitude(n, fraction):
    rewards = torch.rand(n, generator=torch.Generator().manual_seed(1))
    noisy, mask = add_reward_noise(rewards, fraction, 0.3, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and int(mask.sum()) == num_noisy(n, fraction)
    diff = noisy - rewards
    assert torch.equal(noisy[~mask], rewards[~mask])
    assert torch.allclose(diff[mask].abs(), torch.full_like(diff[mask], 0.3), atol=1e-6)
    assert noisy.dtype == rewards.dtype and rewards.shape == noisy.shape


def test_noise_rounding_signs_and_determinism():
    assert ([num_noisy(n, f) for n, f in [(10, 0.4), (5, 0.5), (7, 0.5), (3, 0.5), (4, 0.1)]]
            == [4, 3, 4, 2, 0])
    r = torch.zeros(2000)
    a, ma = add_reward_noise(r, 0.4, 0.3, torch.Generator().manual_seed(5))
    b, mb = add_reward_noise(r, 0.4, 0.3, torch.Generator().manual_seed(5))
    c, _ = add_reward_noise(r, 0.4, 0.3, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and torch.equal(ma, mb) and not torch.equal(a, c)
    plus = int((a > 0).sum())
    assert 300 < plus < 500 and plus + int((a < 0).sum()) == 800  # both signs, about half each
    g = torch.Generator().manual_seed(5)
    first, _ = add_reward_noise(r, 0.4, 0.3, g)
    second, _ = add_reward_noise(r, 0.4, 0.3, g)  # the generator advances between steps
    assert not torch.equal(first, second)


def test_noise_rejects_bad_inputs():
    g = torch.Generator()
    with pytest.raises(ValueError, match="fraction"):
        add_reward_noise(torch.zeros(4), 1.5, 0.3, g)
    with pytest.raises(ValueError, match="magnitude"):
        add_reward_noise(torch.zeros(4), 0.4, -0.3, g)
    with pytest.raises(ValueError, match="rewards"):
        add_reward_noise(torch.zeros(2, 2), 0.4, 0.3, g)
    with pytest.raises(TypeError, match="generator"):
        add_reward_noise(torch.zeros(4), 0.4, 0.3, 0)


def test_uniform_group_mask():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.1, 1.0, 0.9, 0.9, 0.9])
    assert uniform_group_mask(r, 3).tolist() == [True, True, False, True]
    assert uniform_group_mask(r, 1).tolist() == [True] * 12
    assert uniform_group_mask(r, 12).tolist() == [False]
    with pytest.raises(ValueError, match="group_size"):
        uniform_group_mask(r, 5)


@pytest.mark.parametrize("answer, truth", [
    ("12", "12"), ("012", "12"), ("-0", "0"), ("+7", "7"), ("-3", "3"), ("13", "12"),
    ("\\boxed{-41}", "-41"), ("$-41$", "-40"), ("100000000000000000001", "100000000000000000000"),
])
def test_integer_fast_path_agrees_with_math_verify(answer, truth, monkeypatch):
    """Two integer literals are compared as ints, without math-verify, and the verdict is the
    one math-verify gives."""
    slow = verifiable._math_equal(answer, truth)
    calls = []
    monkeypatch.setattr(verifiable, "_math_equal", lambda *a: calls.append(a) or slow)
    assert answer_reward(answer, truth) == float(slow)
    assert not calls
