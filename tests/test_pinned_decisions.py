"""The parity tests' decision pins (pinned_decisions.py) can fail: a decision input that
differs, or a step that makes other decisions, is reported; a near tie takes the recorded
choice."""
import numpy as np
import pytest
import torch

from pinned_decisions import DecisionPins
from turbox_mm.models.sparse4d import matching
from turbox_mm.models.sparsedrive import motion_target


def _step(cost, pred):
    rows, cols = matching.solve(cost)
    mode = motion_target.best_mode(pred, torch.zeros(3, 2), torch.ones(3))
    return cols.tolist(), mode.tolist()


def test_a_near_tie_takes_the_recorded_choice():
    pins = DecisionPins()
    tie = np.array([[1.0, 1.0 + 1e-6], [1.0, 1.0]])
    pred = torch.zeros(2, 3, 2)
    pred[1] += 1e-5
    with pins.record():
        recorded = _step(tie, pred)
    flipped = tie.copy()
    flipped[0, 1] -= 2e-6  # the other assignment is now optimal
    pred2 = pred.clone()
    pred2[0] += 2e-5  # and mode 1 is nearer
    own = _step(flipped, pred2)
    assert own[0] != recorded[0] and own[1] != recorded[1]
    with pins.replay():
        assert _step(flipped, pred2) == recorded
    assert len(pins.flips) == 2


def test_inputs_that_differ_fail():
    pins = DecisionPins()
    cost = np.eye(3)
    with pins.record():
        _step(cost, torch.zeros(2, 3, 2))
    with pytest.raises(AssertionError, match='assignment 0: cost matrix'):
        with pins.replay():
            _step(cost + 0.01 * np.arange(9).reshape(3, 3), torch.zeros(2, 3, 2))
    with pytest.raises(AssertionError, match='best mode 0: distances'):
        with pins.replay():
            _step(cost, torch.ones(2, 3, 2))


def test_a_step_with_other_decisions_fails():
    pins = DecisionPins()
    with pins.record():
        _step(np.eye(3), torch.zeros(2, 3, 2))
    with pytest.raises(AssertionError, match='cost shape'):
        with pins.replay():
            _step(np.eye(2), torch.zeros(2, 3, 2))
    with pytest.raises(AssertionError, match='made 0 of 1 assignments'):
        with pins.replay():
            pass
    with pytest.raises(AssertionError, match='not made in the recorded step'):
        with pins.replay():
            _step(np.eye(3), torch.zeros(2, 3, 2))
            matching.solve(np.eye(3))
