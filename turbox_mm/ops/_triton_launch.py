"""What the Triton launchers of the sampling ops share: a forward/backward kernel pair, its
autotuners and the launch rule.

The rule: on CUDA without an explicit ``config`` the kernel is autotuned (one autotuner per
kind and tile layout, made on first use); otherwise it runs with ``config``, or, under
``TRITON_INTERPRET=1``, with the op's fixed interpreter configuration. Launches happen on the
tensors' device. Imported only by the ops' ``triton_kernels`` modules (it imports Triton).

Every launch is on the host's critical path (training steps are host-bound), so the launch
does the least it can: the autotuner runs once per key, after which the kernel is launched
with the configuration it picked (Triton's ``Autotuner.run`` would rebuild its key from the
arguments on each call), and :func:`cdiv` / :func:`next_power_of_2` are plain Python
(``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects, several
microseconds a call from the host).
"""
from typing import Callable, Dict, List, Optional, Sequence

import torch
import triton


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, as ``triton.cdiv``, at the cost of a Python division.

    Examples:
        >>> cdiv(7, 2), cdiv(8, 2), cdiv(0, 4)
        (4, 4, 0)
    """
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` for ``n >= 1`` (0 for 0), as
    ``triton.next_power_of_2``.

    Examples:
        >>> [next_power_of_2(n) for n in (0, 1, 3, 4, 5, 32)]
        [0, 1, 4, 4, 8, 32]
    """
    return 1 << (n - 1).bit_length() if n > 0 else 0


def on_device(device: torch.device, launch: Callable[[], None]) -> None:
    """Run ``launch()`` with ``device`` current: Triton launches on the current CUDA device,
    which may not be the tensors' one."""
    if device.type == 'cuda' and device.index is not None and \
            device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            launch()
    else:
        launch()


class KernelPair:
    """An op's forward and backward kernels with their autotuning.

    Args:
        fwd: The forward ``triton.jit`` kernel.
        bwd: The backward ``triton.jit`` kernel.
        configs (Callable): ``configs(kind, *layout) -> list[triton.Config]``, the candidates
            of kernel ``kind`` ('fwd' or 'bwd') for a tile layout (padded block sizes).
        key (Sequence[str]): The shape arguments autotuning keys on.
        reset_to_zero (Sequence[str]): The backward's outputs that accumulate (zeroed before
            each autotuning trial).
        forward_reset_to_zero (Sequence[str]): The forward's outputs that accumulate.
            Defaults to none.
    """

    def __init__(self, fwd, bwd, configs: Callable[..., List['triton.Config']],
                 key: Sequence[str], reset_to_zero: Sequence[str],
                 forward_reset_to_zero: Sequence[str] = ()):
        self.fwd, self.bwd = fwd, bwd
        self.configs = configs
        self.key = list(key)
        self.reset_to_zero = list(reset_to_zero)
        self.forward_reset_to_zero = list(forward_reset_to_zero)
        self._tuned: Dict[tuple, object] = {}
        # (kind, layout, key values, argument dtypes) -> the autotuner's pick, as kwargs.
        self._picked: Dict[tuple, dict] = {}

    def tuned(self, kind: str, *layout: int):
        """The autotuned ``kind`` ('fwd' or 'bwd') kernel for this tile layout."""
        cache_key = (kind, *layout)
        if cache_key not in self._tuned:
            if kind == 'fwd':
                self._tuned[cache_key] = triton.autotune(
                    self.configs('fwd', *layout), key=self.key,
                    reset_to_zero=self.forward_reset_to_zero or None)(self.fwd)
            else:
                self._tuned[cache_key] = triton.autotune(
                    self.configs('bwd', *layout), key=self.key,
                    reset_to_zero=self.reset_to_zero)(self.bwd)
        return self._tuned[cache_key]

    def config_dicts(self, kind: str, *layout: int) -> List[dict]:
        """The candidates of :meth:`tuned` as dicts of block sizes and ``num_warps``, which the
        launchers take as ``config=`` (tests run every one of them)."""
        return [dict(c.kwargs, num_warps=c.num_warps) for c in self.configs(kind, *layout)]

    def launch(self, kind: str, layout: Sequence[int], device: torch.device,
               grid: Callable[[dict], tuple], args: tuple, kwargs: dict,
               config: Optional[dict], interpreter_config: dict) -> None:
        """Run kernel ``kind`` over ``grid(meta)`` programs with ``args`` and ``kwargs``.

        Args:
            kind (str): 'fwd' or 'bwd'.
            layout (Sequence[int]): The tile layout :meth:`tuned` is keyed on.
            device (torch.device): The tensors' device.
            grid (Callable): The launch grid from the block sizes of a configuration.
            args (tuple): The kernel's tensor arguments.
            kwargs (dict): Its scalar and fixed ``constexpr`` arguments.
            config (dict, optional): One of :meth:`config_dicts`; replaces autotuning on CUDA
                and ``interpreter_config`` elsewhere.
            interpreter_config (dict): The configuration without CUDA (Triton's interpreter).
        """
        kernel = self.fwd if kind == 'fwd' else self.bwd
        if device.type != 'cuda':
            if config is None:
                config = interpreter_config
            kernel[grid(config)](*args, **kwargs, **config)
            return
        on_device(device, lambda: self._launch_cuda(kind, kernel, layout, grid, args, kwargs,
                                                    config))

    def _launch_cuda(self, kind: str, kernel, layout: Sequence[int], grid: Callable,
                     args: tuple, kwargs: dict, config: Optional[dict]) -> None:
        """:meth:`launch` on the current CUDA device."""
        if config is not None:
            kernel[grid(config)](*args, **kwargs, **config)
            return
        # The autotuner's key: the key arguments and every argument's dtype (ours are tensors).
        key = (kind, *layout, *[kwargs[name] for name in self.key], *[a.dtype for a in args])
        picked = self._picked.get(key)
        if picked is not None:
            kernel[grid(picked)](*args, **kwargs, **picked)
            return
        tuner = self.tuned(kind, *layout)
        tuner[grid](*args, **kwargs)  # benchmarks the candidates the first time it sees the key
        best = getattr(tuner, 'best_config', None)  # what it launched with
        if best is not None:
            self._picked[key] = best.all_kwargs()
