"""The process pool of the info-file writers (``map-gt``, ``sparsedrive-map``): tasks of
samples, each answered with ``[(key, value)]``, merged into one dict, with a progress bar."""
from multiprocessing import get_all_start_methods, get_context
from typing import Callable, Dict, List, Optional


def run_tasks(fn: Callable[[tuple], List[tuple]], tasks: List[tuple], workers: int,
              progress: bool, total: int, desc: str,
              worker_cache: Optional[Dict] = None) -> Dict:
    """Every task's ``(key, value)`` pairs in one dict: ``fn`` on each task, in a pool of
    ``workers`` processes (fork where the platform has it) unless ``workers`` is 1.

    Args:
        fn (callable): A module-level function (the pool pickles it): task -> pairs.
        tasks (list[tuple]): The tasks, in order.
        workers (int): Processes; 1 runs the tasks in this process.
        progress (bool): Show a tqdm bar of ``total`` samples named ``desc``.
        total (int): Samples in all tasks (the bar's length).
        desc (str): The bar's name.
        worker_cache (dict, optional): The caller's per-process cache (one location's map),
            emptied here at the end, whatever happened. Defaults to None.

    Returns:
        dict: The union of every task's pairs.
    """
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=desc, unit='sample')
    pool = None
    if workers > 1:
        method = 'fork' if 'fork' in get_all_start_methods() else 'spawn'
        pool = get_context(method).Pool(workers)
    out = {}
    try:
        for result in (pool.imap(fn, tasks) if pool is not None else map(fn, tasks)):
            out.update(result)
            if bar is not None:
                bar.update(len(result))
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if worker_cache is not None:
            worker_cache.clear()
    return out
