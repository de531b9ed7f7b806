"""The two-route testbed task (icpo.tasks.routes), the probing helpers (icpo.tasks.probe) and
scripts/measure_premise.py."""

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from icpo.rewards.verifiable import answer_reward, extract_answer
from icpo.tasks.arithmetic import make_records, solve
from icpo.tasks.probe import Graded
from icpo.tasks.routes import (
    DIFFICULTY,
    pretraining_response,
    route_of,
    route_response,
    route_steps,
    slips,
)


def test_route_a_drops_the_sign_and_route_b_adds_the_opposite():
    assert route_response("4 - 8 - 9", "A") == "<think> 4-8=4, 4-9=5 </think> <answer> 5 </answer>"
    assert (route_response("4 - 8 - 9", "B")
            == "<think> 4+(-8)=-4, -4+(-9)=-13 </think> <answer> -13 </answer>")
    assert route_steps("3 * 4 - 2", "A") == (["3*4=12", "12-2=10"], 10)
    assert route_steps("3 * 4 - 2", "B") == (["3*4=12", "12+(-2)=10"], 10)
    assert route_steps("2 - (3 - 9)", "B") == (["3+(-9)=-6", "2+6=8"], 8)
    assert slips("4 - 8 - 9") and not slips("3 * 4 - 2")
    with pytest.raises(ValueError, match="route"):
        route_steps("1 - 2", "C")


def test_route_b_is_always_right_and_route_a_slips_on_about_half():
    exprs = [r["extra_info"]["expression"] for r in make_records("val", 400, difficulty=DIFFICULTY)]
    for e in exprs:
        truth = solve(e)[1]
        assert answer_reward(extract_answer(route_response(e, "B")), str(truth)) == 1.0
        assert (route_steps(e, "A")[1] == truth) == (not slips(e))
    assert 0.35 < sum(map(slips, exprs)) / len(exprs) < 0.65


def test_route_of_and_the_pretraining_mixture():
    assert route_of(route_response("4 - 8 - 9", "A")) == "A"
    assert route_of(route_response("4 - 8 - 9", "B")) == "B"
    assert route_of(route_response("3 * 4 * 2", "A")) is None  # no subtraction: the routes coincide
    assert route_of("<think> -4*2=-8 </think>") is None  # a sign is not a subtraction
    rng = random.Random(0)
    picks = [route_of(pretraining_response("9 - 12 * 1", rng, 0.2)) for _ in range(2000)]
    assert 0.17 < picks.count("B") / len(picks) < 0.23 and set(picks) == {"A", "B"}
    with pytest.raises(ValueError, match="route_b_fraction"):
        pretraining_response("1 - 2", rng, 1.5)


def test_measure_premise_reports_the_trainers_premise_metrics(monkeypatch):
    """The script's premise numbers are premise_metrics on its samples, with ICPO's scores at its
    delta; sampling is faked (hand-made groups) so that no model runs."""
    import icpo.tasks.probe as probe
    from icpo.algorithms.premise import premise_metrics
    from icpo.ops import preference_scores

    path = Path(__file__).resolve().parents[1] / "scripts" / "measure_premise.py"
    spec = importlib.util.spec_from_file_location("measure_premise", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    conf = [-0.5, -0.1, -0.3, -0.2, -0.4, -0.6, -0.9, -0.2, -0.95]
    ok = [True, True, False, False, False, False, True, False, False]
    rewards = [1.0 if k else 0.1 for k in ok]
    texts = [route_response("4 - 8 - 9", "A" if i % 2 else "B") for i in range(9)]
    graded = Graded(texts, ok, rewards, [[1]] * 9, [[2]] * 9, 3)
    monkeypatch.setattr(probe, "load", lambda path: (None, None))
    monkeypatch.setattr(probe, "sample_graded", lambda m, t, records, g, *a: graded)
    monkeypatch.setattr(probe, "response_confidence", lambda m, p, r: conf)
    got = script.measure("icpo/tiny-routes", "routes", 3, 3, 0, delta=0.3, tau=1.5)
    want = premise_metrics(torch.tensor(conf), torch.tensor(ok), torch.tensor(rewards),
                           preference_scores(torch.tensor(conf), 3, delta=0.3), 3, 1.5)
    assert {k: got[k] for k in want} == want and got["premise/pairs"] == 4
    assert got["mixed_groups"] == 2 and got["accuracy"] == pytest.approx(3 / 9)
    assert got["routes"]["A"]["share"] == pytest.approx(4 / 9)


def test_bundled_testbed_model_is_small_and_shares_the_tokenizer():
    from icpo.models import TINY_MODEL, TINY_ROUTES_MODEL, bundled_model_dir, resolve_model_path

    folder = bundled_model_dir(TINY_ROUTES_MODEL)
    assert resolve_model_path(TINY_ROUTES_MODEL) == str(folder)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 10 * 2**20
    assert ((folder / "tokenizer.json").read_bytes()
            == (bundled_model_dir(TINY_MODEL) / "tokenizer.json").read_bytes())


def test_testbed_model_takes_the_slipping_route_greedily():
    """Greedy on a problem with a negative difference: route A with the sign dropped (a confident
    error), which is what the testbed is built to have."""
    import torch

    from icpo.tasks.probe import load

    model, tok = load("icpo/tiny-routes")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Compute: 3 - 11 * 2"}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert (route_of(text) == "A"
            and extract_answer(text) == str(route_steps("3 - 11 * 2", "A")[1])), text
