"""What the ranks' meetings through the store cost at scale, by simulation: bnpass's agreement
(bnpass/agree.py ``agree_among``) and group making (bnpass/groups.py ``meet_to_make``) for W
simulated ranks, a thread each with its own client of one TCPStore (no model, no process group),
arriving spread uniformly over S seconds.

    python benchmarks/agreement_scale.py                  # W = 8, 64, 256, 1024; spreads 0 and 30 s
    python benchmarks/agreement_scale.py --ranks 1024 --repeat 3 --write

Per run: store requests per rank (mean / max, counted by a proxy around each rank's client), all
requests, the time from the last arrival until every rank knows the outcome (returned, or raised),
whether every rank agreed (or, with one rank divergent, raised), and the longest error message.
``--write`` appends the table to benchmarks/RESULTS.md under the command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import resource
import threading
import time
from typing import Optional

from torch.distributed import PrefixStore, TCPStore

from bnpass.agree import agree_among
from bnpass.errors import BNPassError
from bnpass.groups import meet_to_make

RESNET_CHANNELS = [64] * 5 + [128] * 5 + [256] * 5 + [512] * 5  # 20 BatchNorms, a collective each


class CountingStore:
    """A store that counts the requests made through it (every method call is one request: ``add``,
    ``append``, ``compare_set``, ``wait(keys)`` and ``check(keys)`` are each one on a TCPStore)."""

    def __init__(self, store):
        self._store = store
        self.requests = 0

    def __getattr__(self, name):
        method = getattr(self._store, name)

        def counted(*args, **kwargs):
            self.requests += 1
            return method(*args, **kwargs)

        return counted


def entries(odd: bool = False) -> list:
    """A resnet18-like forward sequence (bnpass/agree.py ``_entries``); ``odd``: collective 7
    reduces two channels more (a rank with another model)."""
    out = []
    for i, c in enumerate(RESNET_CHANNELS):
        c += 2 if odd and i == 7 else 0
        out.append(["sum", 2 * c + 1, "float32", "0", "process_group", [[f"bn{i}", "batch_norm", c, "float32"]]])
    return out


def _agreement(store, rank: int, world: int, odd: bool, timeout_s: float) -> None:
    agree_among(store, rank, list(range(world)), entries(odd), timeout_s,
                f"{len(RESNET_CHANNELS)} BatchNorm2d: sync", "pack_collectives=True", "forward")


def _group_making(store, rank: int, world: int, odd: bool, timeout_s: float) -> None:
    meet_to_make(store, rank, list(range(world)), "0", 4 + odd, timeout_s,
                 f"the groups of {world // 8} consecutive ranks")


PROTOCOLS = {"agreement": _agreement, "group making": _group_making}


def open_ulimit(world: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * world + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


_SHARED: dict = {"server": None, "clients": [], "runs": 0}  # one server and its clients, for every run


def stores(world: int, timeout_s: float = 600.0) -> list[CountingStore]:
    """``world`` counted stores, each a client of this process's TCPStore server under a key prefix
    of its own run (a fresh meeting space): the clients are made once and kept, connected 64 at a
    time, because about one connection in seven to a libuv TCPStore server takes 5 s here (torch
    2.14), which would otherwise dominate a run's set-up."""
    from concurrent.futures import ThreadPoolExecutor

    if _SHARED["server"] is None:
        _SHARED["server"] = TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False,
                                     timeout=datetime.timedelta(seconds=timeout_s))
    port, clients = _SHARED["server"].port, _SHARED["clients"]
    open_ulimit(world)

    def one(_):
        return TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=timeout_s))

    if len(clients) < world:
        with ThreadPoolExecutor(64) as pool:
            clients.extend(pool.map(one, range(world - len(clients))))
    _SHARED["runs"] += 1
    prefix = f"run{_SHARED['runs']}"
    return [CountingStore(PrefixStore(prefix, c)) for c in clients[:world]]


def simulate(protocol: str, world: int, spread_s: float, odd_rank: Optional[int] = None,
             absent_rank: Optional[int] = None, timeout_s: float = 120.0, seed: int = 0,
             repeat: int = 1) -> dict:
    """Run ``protocol`` for ``world`` simulated ranks on a fresh key space of one TCPStore (``stores``);
    ``odd_rank`` comes with
    another sequence (or process-group count), ``absent_rank`` never comes. ``repeat``: each rank
    runs the protocol that many times in a row (a graph's agreement, then its recompiles). Per
    rank: requests, when it arrived and knew, its error."""
    clients = stores(world)
    rng = random.Random(seed)
    arrive_at = [rng.uniform(0, spread_s) for _ in range(world)]
    run = PROTOCOLS[protocol]
    arrived, known, errors = [None] * world, [None] * world, [None] * world
    t0 = time.monotonic() + 0.5

    def rank_main(rank: int) -> None:
        time.sleep(max(0.0, t0 + arrive_at[rank] - time.monotonic()))
        arrived[rank] = time.monotonic()
        try:
            for _ in range(repeat):
                run(clients[rank], rank, world, rank == odd_rank, timeout_s)
        except BNPassError as e:
            errors[rank] = str(e)
        known[rank] = time.monotonic()

    threads = [threading.Thread(target=rank_main, args=(r,), daemon=True)
               for r in range(world) if r != absent_rank]
    for t in threads:
        t.start()
    stop = time.monotonic() + timeout_s + spread_s + 30  # a deadline for the whole run
    for t in threads:
        t.join(max(0.0, stop - time.monotonic()))
    came = [r for r in range(world) if r != absent_rank]
    requests = [clients[r].requests for r in came]
    last = max(arrived[r] for r in came if arrived[r] is not None)
    return {"protocol": protocol, "world": world, "spread_s": spread_s, "odd_rank": odd_rank,
            "absent_rank": absent_rank, "requests": requests, "all_requests": sum(requests),
            "knows_s": max(known[r] if known[r] is not None else float("inf") for r in came) - last,
            "each_knows_s": sorted(known[r] - last for r in came if known[r] is not None), "errors": [errors[r] for r in came],
            "unfinished": sum(known[r] is None for r in came), "first_arrival": min(a for a in arrived if a is not None) - t0,
            "last_arrival": last - t0}


def row(result: dict, knows_s: Optional[list] = None) -> str:
    """One table row; ``knows_s``: the times of several runs of the same case (median, then the
    slowest, in brackets)."""
    req = result["requests"]
    errors = [e for e in result["errors"] if e is not None]
    knows = sorted(knows_s or [result["knows_s"]])
    knows_text = f"{knows[len(knows) // 2] * 1e3:.0f} ms" + \
        (f" ({len(knows)} runs; slowest {knows[-1] * 1e3:.0f} ms)" if len(knows) > 1 else "")
    case = "one rank divergent" if result["odd_rank"] is not None else "all agree"
    outcome = (f"all {len(req)} raised" if len(errors) == len(req) else
               f"all {len(req)} agreed" if not errors else f"{len(errors)} of {len(req)} raised")
    longest = max((len(e) for e in errors), default=0)
    return (f"| {result['protocol']} | {result['world']} | {result['spread_s']:g} | {case} | "
            f"{sum(req) / len(req):.1f} / {max(req)} | {result['all_requests']:,} | "
            f"{knows_text} | {outcome} | {longest or '-'} |")


HEADER = ["| protocol | W | spread (s) | case | requests per rank (mean / max) | all requests | "
          "last arrival → every rank knows | outcome | longest message (chars) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 256, 1024])
    parser.add_argument("--spreads", type=float, nargs="+", default=[0.0, 30.0])
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each case: the median time to know, and the slowest")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    lines = list(HEADER)
    print("\n".join(lines), flush=True)
    for protocol in args.protocols:
        for world in args.ranks:
            for spread in args.spreads:
                for odd in (None, world // 2 + 1):
                    runs = [simulate(protocol, world, spread, odd_rank=odd, seed=world + i)
                            for i in range(args.repeat)]
                    lines.append(row(runs[-1], [r["knows_s"] for r in runs]))
                    print(lines[-1], flush=True)
    if args.write:
        from results_file import append_results

        cpus = len(os.sched_getaffinity(0))
        append_results(os.path.join(os.path.dirname(__file__), "RESULTS.md"), "agreement_scale.py",
                       [f"{cpus} CPU(s) shared with other work, one TCPStore server (libuv) and a "
                        "thread per simulated rank in one process (every rank's Python on one "
                        "interpreter).", ""] + lines)


if __name__ == "__main__":
    main()
