"""The affinity plan (pure): which cores each local rank's main process and workers get.

:func:`plan_affinity` splits the allowed CPUs among the local ranks and each rank's share among
its main process and loader workers; :class:`RankLayout` is one rank's part and
:func:`format_plan` the report of a plan.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .affinity_machine import format_cpulist


@dataclass(frozen=True)
class RankLayout:
    """The cores of one local rank.

    Attributes:
        local_rank (int): The rank on this node.
        main (tuple[int]): Cores of the main (training) process.
        workers (tuple[tuple[int]]): Cores of loader worker ``i`` at index ``i``; empty when the
            loader has no workers.
        node (int | None): The NUMA node the rank's cores were taken from first.
        notes (tuple[str]): Where cores had to be shared or left unused, and why.
    """

    local_rank: int
    main: Tuple[int, ...]
    workers: Tuple[Tuple[int, ...], ...]
    node: Optional[int] = None
    notes: Tuple[str, ...] = field(default=())

    @property
    def cores(self) -> Tuple[int, ...]:
        """All cores of the rank, sorted."""
        return tuple(sorted(set(self.main).union(*self.workers)))

    def describe(self) -> str:
        """One line: ``rank 0 (node 0): main 0-3 | workers 4-6, 7-9``."""
        node = '' if self.node is None else f' (node {self.node})'
        workers = ', '.join(format_cpulist(w) for w in self.workers) or 'none'
        return f'local rank {self.local_rank}{node}: main {format_cpulist(self.main)} | ' \
               f'workers {workers}'


def plan_affinity(allowed: Sequence[int],
                  local_world_size: int = 1,
                  num_workers: int = 0,
                  numa_nodes: Optional[Mapping[int, Sequence[int]]] = None,
                  gpu_nodes: Optional[Sequence[Optional[int]]] = None,
                  cpu_limit: Optional[float] = None,
                  main_cores: Optional[int] = None) -> List[RankLayout]:
    """Split the allowed CPUs among the local ranks, and each rank's among its processes.

    1. Cores usable: ``allowed``, cut to ``floor(cpu_limit)`` where the cgroup sets a quota
       (more busy cores than the quota only get the cgroup throttled).
    2. Each local rank gets ``usable // local_world_size`` cores, disjoint from the others,
       taken first from its GPU's NUMA node (``gpu_nodes``) or, where that is unknown, from
       node ``rank * nodes // local_world_size`` (ranks spread over nodes the way GPUs
       usually are); a node's cores go in equal shares to the ranks that prefer it, and a rank
       short of cores tops up from the other nodes. Fewer cores than ranks: ranks share.
    3. Within a rank: the main process gets ``main_cores`` cores (automatic: an equal share
       with the workers, ``ceil(cores / (num_workers + 1))``, at least one); the rest is cut
       into ``num_workers`` contiguous, near-equal, disjoint sets. Fewer cores left than
       workers: every worker gets all of them (the scheduler balances), and a note says so.

    Args:
        allowed (Sequence[int]): CPUs the process may run on (``os.sched_getaffinity(0)``).
        local_world_size (int): Processes (GPUs) on this node. Defaults to 1.
        num_workers (int): Loader workers per rank. Defaults to 0.
        numa_nodes (Mapping[int, Sequence[int]], optional): CPUs of each NUMA node. Defaults to
            None (one node).
        gpu_nodes (Sequence[int | None], optional): NUMA node of local rank ``i``'s GPU.
            Defaults to None (unknown).
        cpu_limit (float, optional): The cgroup's CPU quota in cores. Defaults to None.
        main_cores (int, optional): Cores for each main process. Defaults to None (automatic).

    Returns:
        list[RankLayout]: One per local rank, in rank order.

    Raises:
        ValueError: An argument is out of range; the message names it and its valid values.

    Examples:
        >>> plans = plan_affinity(range(16), local_world_size=2, num_workers=3)
        >>> [p.describe() for p in plans]
        ['local rank 0 (node 0): main 0-1 | workers 2-3, 4-5, 6-7', \
'local rank 1 (node 0): main 8-9 | workers 10-11, 12-13, 14-15']
    """
    allowed = sorted(set(int(c) for c in allowed))
    if not allowed:
        raise ValueError('plan_affinity: allowed must name at least one CPU')
    if not isinstance(local_world_size, int) or local_world_size < 1:
        raise ValueError(f'plan_affinity: local_world_size must be an int >= 1, got '
                         f'{local_world_size!r}')
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f'plan_affinity: num_workers must be an int >= 0, got {num_workers!r}')
    if main_cores is not None and (isinstance(main_cores, bool)
                                   or not isinstance(main_cores, int) or main_cores < 1):
        raise ValueError(f'main_cores must be None (automatic) or an int >= 1, got '
                         f'{main_cores!r}')
    if gpu_nodes is not None and len(gpu_nodes) < local_world_size:
        raise ValueError(f'plan_affinity: gpu_nodes has {len(gpu_nodes)} entries for '
                         f'{local_world_size} local ranks')
    notes: List[str] = []
    allowed_set = set(allowed)

    # Group the allowed CPUs by NUMA node, in node order.
    nodes: Dict[int, List[int]] = {}
    for node, cpus in sorted((numa_nodes or {}).items()):
        mine = [c for c in sorted(cpus) if c in allowed_set]
        if mine:
            nodes[node] = mine
    placed = {c for cpus in nodes.values() for c in cpus}
    rest = [c for c in allowed if c not in placed]
    if rest:
        nodes[max(nodes) + 1 if nodes else 0] = rest
    node_ids = list(nodes)

    usable = len(allowed)
    if cpu_limit is not None and cpu_limit < usable:
        usable = max(1, int(math.floor(cpu_limit + 1e-9)))
        notes.append(f'cgroup CPU quota {cpu_limit:g} cores: using {usable} of '
                     f'{len(allowed)} allowed CPUs')

    per_rank = usable // local_world_size
    shares: List[List[int]] = []
    rank_node: List[Optional[int]] = []
    if per_rank == 0:
        ordered = [c for n in node_ids for c in nodes[n]][:usable]
        notes.append(f'{usable} usable CPUs for {local_world_size} local ranks: ranks share '
                     'cores')
        for rank in range(local_world_size):
            core = ordered[rank % len(ordered)]
            shares.append([core])
            rank_node.append(next(n for n in node_ids if core in nodes[n]))
    else:
        pools = {n: list(cpus) for n, cpus in nodes.items()}
        for rank in range(local_world_size):
            wanted = gpu_nodes[rank] if gpu_nodes is not None else None
            if wanted not in pools:
                wanted = node_ids[rank * len(node_ids) // local_world_size]
            rank_node.append(wanted)
        shares = [[] for _ in range(local_world_size)]
        # Pass 1: a node's cores in equal shares to the ranks that prefer it.
        for node in node_ids:
            ranks = [r for r in range(local_world_size) if rank_node[r] == node]
            if not ranks:
                continue
            each = min(per_rank, len(pools[node]) // len(ranks))
            for r in ranks:
                shares[r], pools[node] = pools[node][:each], pools[node][each:]
        # Pass 2: top up, own node first, then the others in node order.
        for r in range(local_world_size):
            for node in [rank_node[r]] + [n for n in node_ids if n != rank_node[r]]:
                need = per_rank - len(shares[r])
                if need <= 0:
                    break
                shares[r] += pools[node][:need]
                pools[node] = pools[node][need:]
            if any(c not in nodes[rank_node[r]] for c in shares[r]):
                notes.append(f'local rank {r}: its NUMA node {rank_node[r]} has too few free '
                             'cores; some come from another node')
        unused = usable - per_rank * local_world_size
        if unused:
            notes.append(f'{unused} usable CPU(s) left unused so that ranks get equal shares')

    layouts = []
    for rank, share in enumerate(shares):
        rank_notes = list(notes)
        main, workers = _split_rank(share, num_workers, main_cores, rank_notes)
        layouts.append(RankLayout(rank, tuple(main), tuple(tuple(w) for w in workers),
                                  rank_node[rank], tuple(rank_notes)))
    return layouts


def _split_rank(share: List[int], num_workers: int, main_cores: Optional[int],
                notes: List[str]) -> Tuple[List[int], List[List[int]]]:
    if num_workers == 0:
        return share, []
    n = len(share)
    main_n = main_cores if main_cores is not None else max(1, math.ceil(n / (num_workers + 1)))
    if main_n >= n:
        if main_cores is not None and main_cores > n:
            notes.append(f'main_cores={main_cores} but the rank has {n} core(s): main '
                         'process gets all of them')
        notes.append(f'{num_workers} worker(s) share the main process\'s {n} core(s)')
        return share, [list(share) for _ in range(num_workers)]
    main, pool = share[:main_n], share[main_n:]
    if len(pool) < num_workers:
        notes.append(f'{num_workers} workers share {len(pool)} core(s)')
        return main, [list(pool) for _ in range(num_workers)]
    base, extra = divmod(len(pool), num_workers)
    workers, start = [], 0
    for i in range(num_workers):
        size = base + (1 if i < extra else 0)
        workers.append(pool[start:start + size])
        start += size
    return main, workers


def format_plan(layouts: Sequence[RankLayout], allowed: Sequence[int],
                cpu_limit: Optional[float] = None) -> str:
    """A multi-line report of a plan: the inputs, one line per rank, then the notes."""
    limit = 'none' if cpu_limit is None else f'{cpu_limit:g} cores'
    lines = [f'allowed CPUs {format_cpulist(allowed)} ({len(allowed)}), cgroup quota {limit}']
    lines += [f'  {layout.describe()}' for layout in layouts]
    seen = []
    for layout in layouts:
        for note in layout.notes:
            if note not in seen:
                seen.append(note)
    lines += [f'  note: {note}' for note in seen]
    return '\n'.join(lines)
