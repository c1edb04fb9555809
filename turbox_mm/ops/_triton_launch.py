"""What the Triton launchers of the sampling ops share: a forward/backward kernel pair, its
autotuners and the launch rule.

The rule: on CUDA without an explicit ``config`` the kernel is autotuned (one autotuner per
kind and tile layout, made on first use); otherwise it runs with ``config``, or, under
``TRITON_INTERPRET=1``, with the op's fixed interpreter configuration. Launches happen on the
tensors' device. Imported only by the ops' ``triton_kernels`` modules (it imports Triton).
"""
import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import torch
import triton


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
    """

    def __init__(self, fwd, bwd, configs: Callable[..., List['triton.Config']],
                 key: Sequence[str], reset_to_zero: Sequence[str]):
        self.fwd, self.bwd = fwd, bwd
        self.configs = configs
        self.key = list(key)
        self.reset_to_zero = list(reset_to_zero)
        self._tuned: Dict[tuple, object] = {}

    def tuned(self, kind: str, *layout: int):
        """The autotuned ``kind`` ('fwd' or 'bwd') kernel for this tile layout."""
        cache_key = (kind, *layout)
        if cache_key not in self._tuned:
            if kind == 'fwd':
                self._tuned[cache_key] = triton.autotune(self.configs('fwd', *layout),
                                                         key=self.key)(self.fwd)
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
        # Triton launches on the current device: make it the tensors' one.
        guard = torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()
        with guard:
            if device.type == 'cuda' and config is None:
                self.tuned(kind, *layout)[grid](*args, **kwargs)
                return
            if config is None:
                config = interpreter_config
            kernel = self.fwd if kind == 'fwd' else self.bwd
            kernel[grid(config)](*args, **kwargs, **config)
