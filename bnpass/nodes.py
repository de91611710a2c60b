"""The ranks of each host, for ``options={"group_size": "node"}``: statistics per node.

The ranks of a process group meet once through the store (bnpass/meet.py), each bringing the name
of its host as the same-host transport compares them (``host_name``, which the transport uses:
``BNPASS_TRANSPORT_HOST`` where set, else the host name); the meeting's verdict, which groups the
ranks by what they brought, is the map of hosts to ranks: a few store requests per rank, whatever
the number of ranks and hosts. Every host must run the same number of ranks (the statistics of each
node then cover as many samples); otherwise every rank raises a BNPassError naming the hosts and
their counts. Found once per process and group, and kept: a recompile on one rank meets nobody.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Optional

import torch.distributed as dist

from . import meet
from .errors import BNPassError

__all__ = ["node_ranks", "hosts_of", "simulated_hosts", "host_name"]

_PREFIX = "bnpass/nodes"
_FOUND: dict[str, tuple] = {}  # parent group name -> (parent group, this rank's host's ranks)
_SIMULATED: list[Optional[int]] = [None]  # ranks per host in a fake world (simulated_hosts)


def host_name() -> str:
    """The host this rank runs on, as ranks are compared here and by the same-host transport
    (bnpass/transport/channel.py): ``BNPASS_TRANSPORT_HOST`` if set (tests simulate several hosts),
    else the host name."""
    return os.environ.get("BNPASS_TRANSPORT_HOST") or socket.gethostname()


def node_ranks(parent: dist.ProcessGroup, timeout_s: float) -> list[int]:
    """The global ranks of ``parent`` that run on this rank's host."""
    found = _FOUND.get(parent.group_name)
    if found is not None and found[0] is parent:
        return found[1]
    ranks = dist.get_process_group_ranks(parent)
    if dist.get_backend(parent) == "fake":  # `bnpass inspect`'s simulated world
        return _simulated(ranks)
    host = host_name()
    store = dist.distributed_c10d._get_default_store()
    mine = hosts_of(store, dist.get_rank(), ranks, parent.group_name, host, timeout_s)[host]
    _FOUND[parent.group_name] = (parent, mine)
    return mine


@contextlib.contextmanager
def simulated_hosts(ranks_per_node: Optional[int]):
    """In a fake world (``bnpass inspect --ranks-per-node N``): hosts of N consecutive ranks (default
    one host)."""
    _SIMULATED[0] = ranks_per_node
    try:
        yield
    finally:
        _SIMULATED[0] = None


def _simulated(ranks: list[int]) -> list[int]:
    n = _SIMULATED[0] or len(ranks)
    if len(ranks) % n:
        raise BNPassError(f"bnpass: option group_size='node' needs the same number of ranks on every "
                          f"host: {len(ranks)} ranks do not make hosts of {n} (--ranks-per-node)")
    start = ranks.index(dist.get_rank()) // n * n
    return ranks[start : start + n]


def hosts_of(store, rank: int, ranks: list[int], parent: str, host: str, timeout_s: float) -> dict[str, list[int]]:
    """{host: its ranks} of ``ranks`` (of the group named ``parent``), through ``store`` as
    ``rank`` on ``host`` (``node_ranks``; the tests' simulated ranks call it directly)."""
    place = meet.next_meeting(store, f"{_PREFIX}/{parent}/{meet.ranks_key(ranks)}", rank)
    verdict = meet.meet(store, place, rank, host, ranks, timeout_s)
    if verdict.missing:
        late = " (this rank came after it gave up)" if rank in verdict.missing else ""
        raise BNPassError(
            f"bnpass: option group_size='node': {meet.who(verdict.missing)} did not say which host "
            f"it runs on within agree_timeout_s={timeout_s:g} s{late} (dead, failed before compiling, "
            "or not running this code); nothing was reduced. Fix that rank, or raise agree_timeout_s "
            "if it is only slow.")
    by_count: dict[int, list[str]] = {}
    for name, on in sorted(verdict.tokens.items()):
        by_count.setdefault(len(on), []).append(name)
    if len(by_count) > 1:
        counts = "; ".join(f"{n} rank(s) on {len(hosts)} host(s) ({_names(hosts)})"
                           for n, hosts in sorted(by_count.items(), reverse=True))
        raise BNPassError(
            f"bnpass: option group_size='node' needs the same number of ranks on every host (the "
            f"statistics of each node cover its ranks' batches); here {counts}, this rank ({rank}) on "
            f"{host}. Start as many processes on every node (torchrun --nproc-per-node), or pass "
            "group_size=k (consecutive groups of k ranks) or your own process_group.")
    return verdict.tokens


def _names(hosts: list[str], limit: int = 4) -> str:
    more = f" and {len(hosts) - limit} more" if len(hosts) > limit else ""
    return ", ".join(hosts[:limit]) + more
