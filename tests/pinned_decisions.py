"""Discrete decisions of a training step, recorded on one model and replayed on another.

A stock/turbox parity test compares two implementations of the same step. The step makes
discrete choices from float inputs: Hungarian assignments (``matching.solve``) and the
best trajectory mode (``motion_target.best_mode``). At initialisation many of them are near
ties, and float32 rounding that differs between the two paths (or between two CPUs, or thread
counts) flips some of them; the losses then differ by far more than rounding, and the
comparison measures the tie, not the implementations.

:class:`DecisionPins` separates the two questions. While recording (the stock model) it keeps
each decision's input and result, in call order. While replaying (the turbox model) it checks
that each decision's input agrees with the recorded one within tolerance, the actual check of
the two paths up to that point, and then uses the recorded result, so that everything after
the decision is compared on the same choice. A decision whose input differs, a different
number or order of decisions, or a different shape fails the test.
"""
import contextlib
from typing import List, Tuple

import numpy as np
import torch

SOLVE_MODULES = ('turbox_mm.models.sparse4d.matching', 'turbox_mm.models.sparse4d.target',
                 'turbox_mm.models.sparsedrive.map_target')
MODE_MODULES = ('turbox_mm.models.sparsedrive.motion_target',
                'turbox_mm.models.sparsedrive.planning_target')


class DecisionPins:
    """Record the decisions of one step, then replay them in another (module docstring).

    Args:
        rtol (float): Relative tolerance on a decision's inputs when replaying.
        atol (float): Absolute tolerance on a decision's inputs when replaying. Both default
            to 1e-3: the inputs are model outputs, which differ by amplified rounding where
            the replayed run computes its forward values otherwise (the aggregation kernel,
            the motion head's turbox path); measured on the tiny SparseDrive stage 2 while
            it ran the kernel, 1.6e-4 (3.7e-4 relative) in one mode distance of 384. A wrong
            path differs by far more.

    Attributes:
        solves (list): Recorded ``(cost, (rows, cols))`` of every assignment.
        modes (list): Recorded ``(distance, mode)`` of every best-mode choice.
        flips (list[str]): The replayed decisions whose own result differed from the recorded
            one (a near tie that the pin resolved), for the test's report.
    """

    def __init__(self, rtol: float = 1e-3, atol: float = 1e-3) -> None:
        self.rtol, self.atol = rtol, atol
        self.solves: List[Tuple[np.ndarray, Tuple[np.ndarray, np.ndarray]]] = []
        self.modes: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self.flips: List[str] = []

    @contextlib.contextmanager
    def _patched(self, solve, best_mode):
        import importlib
        from unittest import mock
        with contextlib.ExitStack() as stack:
            from turbox_mm.models.sparse4d import matching
            for name in SOLVE_MODULES:
                module = importlib.import_module(name)
                stack.enter_context(mock.patch.object(module, 'solve', solve))
                if hasattr(module, 'solve_on_device'):
                    # the GPU matcher's pairs are scipy's: taken by the host path here, so
                    # that each matrix is one pinned decision
                    stack.enter_context(mock.patch.object(
                        module, 'solve_on_device',
                        lambda cost, num_cols: matching.solve_batched(cost, num_cols)[0]))
            for name in MODE_MODULES:
                stack.enter_context(mock.patch.object(importlib.import_module(name),
                                                      'best_mode', best_mode))
            yield

    @contextlib.contextmanager
    def record(self):
        """Run the step inside: every decision is made as usual and kept."""
        from turbox_mm.models.sparse4d.matching import solve
        from turbox_mm.models.sparsedrive.motion_target import mode_distance

        def recording_solve(cost):
            result = solve(cost)
            self.solves.append((np.array(cost, copy=True), result))
            return result

        def recording_mode(reg_pred, reg_target, reg_weight):
            dist = mode_distance(reg_pred, reg_target, reg_weight)
            mode = dist.argmin(dim=-1)
            self.modes.append((dist.clone(), mode.clone()))
            return mode

        with self._patched(recording_solve, recording_mode):
            yield self

    @contextlib.contextmanager
    def replay(self):
        """Run the other step inside: every decision's input is checked against the record and
        the recorded result is used. On exit, every recorded decision must have been replayed.
        """
        from turbox_mm.models.sparse4d.matching import INVALID_COST, solve
        from turbox_mm.models.sparsedrive.motion_target import mode_distance
        solves, modes = list(self.solves), list(self.modes)

        def replaying_solve(cost):
            call = len(self.solves) - len(solves)
            assert solves, f'assignment {call}: not made in the recorded step'
            ref_cost, (rows, cols) = solves.pop(0)
            assert cost.shape == ref_cost.shape, (
                f'assignment {call}: cost shape {cost.shape}, recorded {ref_cost.shape}')
            np.testing.assert_allclose(np.where(np.isfinite(cost), cost, INVALID_COST),
                                       np.where(np.isfinite(ref_cost), ref_cost, INVALID_COST),
                                       rtol=self.rtol, atol=self.atol,
                                       err_msg=f'assignment {call}: cost matrix')
            own_rows, own_cols = solve(cost)
            if not (np.array_equal(own_rows, rows) and np.array_equal(own_cols, cols)):
                self.flips.append(f'assignment {call} ({cost.shape})')
            return rows, cols

        def replaying_mode(reg_pred, reg_target, reg_weight):
            call = len(self.modes) - len(modes)
            assert modes, f'best mode {call}: not chosen in the recorded step'
            ref_dist, ref_mode = modes.pop(0)
            dist = mode_distance(reg_pred, reg_target, reg_weight)
            torch.testing.assert_close(dist, ref_dist, rtol=self.rtol, atol=self.atol,
                                       msg=lambda m: f'best mode {call}: distances: {m}')
            own = dist.argmin(dim=-1)
            if not torch.equal(own, ref_mode):
                self.flips.append(f'best mode {call} ({int((own != ref_mode).sum())} of '
                                  f'{own.numel()})')
            return ref_mode.to(own.device)

        with self._patched(replaying_solve, replaying_mode):
            yield self
        assert not solves and not modes, (
            f'the replayed step made {len(self.solves) - len(solves)} of {len(self.solves)} '
            f'assignments and {len(self.modes) - len(modes)} of {len(self.modes)} mode choices')
