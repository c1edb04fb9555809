"""Micro benchmarks: one turbox component or op against the stock one it replaces.

Each module here exposes ``benchmark(device: str, quick: bool = False) -> list[dict]``; a row
holds ``component``, ``case``, ``stock`` and ``turbox`` (outputs of
:func:`turbox_mm.benchmark.timing.time_fn`) and an optional ``note``. ``quick=True`` uses tiny
sizes so that the tests can run every benchmark on the CPU in seconds.
``tools/benchmark.py --components [NAME ...]`` runs them and prints one table.
"""
import importlib
import pkgutil
from typing import Callable, Dict, List


def available(kind: str = 'all') -> List[str]:
    """Names of the micro benchmarks in this package, sorted.

    Args:
        kind (str): ``'all'``, ``'op'`` (benchmarks named after an op package of
            :mod:`turbox_mm.ops`: a turbox op against the stock op it replaces) or
            ``'component'`` (the rest). Defaults to ``'all'``.
    """
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))
    if kind == 'all':
        return names
    import turbox_mm.ops as ops
    op_names = {m.name for m in pkgutil.iter_modules(ops.__path__) if m.ispkg}
    if kind == 'op':
        return [n for n in names if n in op_names]
    if kind == 'component':
        return [n for n in names if n not in op_names]
    raise ValueError(f"micro.available: kind must be 'all', 'op' or 'component', got {kind!r}")


def get(name: str) -> Callable[..., List[Dict]]:
    """The ``benchmark`` function of micro benchmark ``name``.

    Raises:
        KeyError: ``name`` is not a micro benchmark; the message lists the valid names.
    """
    names = available()
    if name not in names:
        raise KeyError(f'unknown micro benchmark {name!r}; valid names: {", ".join(names)}')
    return importlib.import_module(f'{__name__}.{name}').benchmark
