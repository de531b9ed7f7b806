"""icpo.algorithms.premise: the per-step diagnostics of ICPO's premise, on hand-counted groups."""

from __future__ import annotations

import math

import pytest
import torch

from icpo.algorithms.premise import premise_metrics
from icpo.ops import preference_scores


def test_hand_counted_groups():
    # Group 0: correct at c = -0.1, -0.5; wrong at -0.3, -0.9.
    #   pairs (correct, wrong): (-0.1,-0.3) no, (-0.1,-0.9) no, (-0.5,-0.3) yes, (-0.5,-0.9) no
    #   most confident: -0.1, correct.
    # Group 1: all correct: no pairs, not mixed. Group 2: correct -0.8 vs wrong -0.2, -0.2, -0.4:
    #   3 pairs, all "correct less confident"; most confident -0.2 (first of the tie), wrong.
    conf = torch.tensor([-0.1, -0.3, -0.5, -0.9, -0.2, -0.2, -0.3, -0.4,
                         -0.2, -0.8, -0.2, -0.4])
    correct = torch.tensor([1, 0, 1, 0, 1, 1, 1, 1, 0, 1, 0, 0])
    rewards = torch.tensor([1.0, 0.1, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.9, 0.1, 0.0])
    # |R| / tau with tau = 2: 0.5, 0.05, 0.5, -, 0.5 x4, -, 0.45, 0.05, -
    scores = torch.tensor([0.6, 0.01, 0.5, 3.0, 0.2, 0.7, 0.49, 0.51, 9.0, 0.44, 0.05, 1.0])
    m = premise_metrics(conf, correct, rewards, scores, 4, tau=2.0)
    assert m["premise/pairs"] == 4 + 3
    assert m["premise/correct_less_confident"] == pytest.approx(4 / 7)
    assert m["premise/top_confident_correct"] == pytest.approx(1 / 2)
    # R != 0: indices 0,1,2,4,5,6,7,9,10 (9 responses); at cap: 0 (0.6>=0.5), 2 (0.5>=0.5),
    # 5, 7, 10 (0.05 >= 0.05) -> 5 of 9. Correct with R != 0: 0,2,4,5,6,7,9 -> 0,2,5,7: 4 of 7.
    assert m["premise/bonus_at_cap"] == pytest.approx(5 / 9)
    assert m["premise/bonus_at_cap_correct"] == pytest.approx(4 / 7)


def test_empty_sets_leave_keys_out_never_nan():
    conf = torch.tensor([-0.1, -0.2, -0.3, -0.4])
    m = premise_metrics(conf, torch.ones(4), torch.zeros(4), torch.ones(4), 2, tau=2.0)
    assert m == {"premise/pairs": 0.0}
    m = premise_metrics(conf, torch.zeros(4, dtype=torch.bool), torch.full((4,), 0.1),
                        torch.zeros(4), 4, tau=2.0)
    assert set(m) == {"premise/pairs", "premise/bonus_at_cap"} and m["premise/bonus_at_cap"] == 0
    assert all(not math.isnan(v) for v in m.values())


def test_equal_confidences_are_not_less_confident():
    m = premise_metrics(torch.full((2,), -0.5), torch.tensor([1, 0]), torch.tensor([1.0, 0.0]),
                        torch.zeros(2), 2, tau=2.0)
    assert m["premise/correct_less_confident"] == 0.0


def test_with_real_scores_the_least_confident_correct_response_is_at_cap():
    # Eq. 9, delta = 0.5, c = -0.40 (correct), -0.50 (correct), -0.45 (wrong); c_top = -0.40:
    # S(-0.50) = 0.5 * (0.45 + 0.40) / 0.50 + 0.5 * 0.40 = 1.05 >= |R| / tau = 0.5 (at cap);
    # S(-0.40) = 0.5 * 0.40 = 0.2 (not). One of the two (correct, wrong) pairs has the correct
    # response less confident.
    conf = torch.tensor([-0.40, -0.50, -0.45])
    scores = preference_scores(conf, 3, delta=0.5)
    torch.testing.assert_close(scores[[1, 0]], torch.tensor([1.05, 0.2]))
    m = premise_metrics(conf, torch.tensor([1, 1, 0]), torch.tensor([1.0, 1.0, 0.0]), scores, 3,
                        tau=2.0)
    assert m["premise/bonus_at_cap"] == 0.5 and m["premise/correct_less_confident"] == 0.5


@pytest.mark.parametrize("kwargs, match", [
    ({"group_size": 3}, "group_size: got 3"),
    ({"tau": 0.0}, "tau: got 0.0"),
    ({"rewards": torch.zeros(3)}, "rewards: got 3 values"),
])
def test_bad_input(kwargs, match):
    args = dict(confidence=torch.zeros(4), correct=torch.zeros(4), rewards=torch.zeros(4),
                scores=torch.zeros(4), group_size=2, tau=2.0)
    with pytest.raises(ValueError, match=match):
        premise_metrics(**{**args, **kwargs})
