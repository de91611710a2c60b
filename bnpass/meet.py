"""Ranks meet through the store with a deadline, in a few store requests each, whatever their number.

Used where ranks must have reached the same point before they may communicate (``agree.py``: the
same collectives; ``groups.py``: making a subgroup; ``nodes.py``: which ranks share a host;
``join.py``: a Join's first step; transport/channel.py: where a group's ranks run). A *meeting*
is a key prefix, its *place*, that every rank of ``ranks`` comes to once, with a *token* (what it
brings: a digest of its collectives, its process-group count, ...). Keys under the place:

* ``arrivals``: ``"<rank>=<token>;"`` appended by each rank as it comes (``append``: one request);
* ``count``: how many came (``add``: one request, which returns the new count);
* ``claim`` and ``verdict``: the outcome, written once. The rank whose ``add`` makes the count the
  number of ranks (the last arrival) reads ``arrivals`` once, groups the ranks by token and claims
  the verdict (``compare_set``: the first claim wins), then ``set``s it under ``verdict``, on which
  every other rank blocks (``wait``: one request, the store wakes it) and which it reads once.

So a rank pays about five requests whatever the world size and however long it waits, instead of
polling one key per rank. A rank whose wait reaches the deadline publishes the verdict itself from
the arrivals so far (the ranks that did not come are ``missing``); the first claim wins, so a rank
that comes later reads that verdict too and no rank goes on alone.

A *series* of meetings (``next_meeting``) numbers them per rank, in the store: ranks that go
through the same steps meet at the same places without agreeing on a name first.

*Standing aside* (``aside``, an optional second prefix; ``agree.py`` for DDP's Join): ranks that will
come to no meeting of a series for a while are appended to ``<aside>/log`` and counted in
``<aside>/count``; an arrival adds that count to its own (one more request), so a meeting whose
other ranks all came is decided at once, naming the ranks that stood aside.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import time
from typing import Optional

__all__ = ["Verdict", "arrive", "meet", "stand_aside", "step_back_in", "ranks_key", "ranks_text",
           "who", "next_meeting", "peek_meeting"]


@dataclasses.dataclass
class Verdict:
    """How a meeting ended: ``tokens`` {token: ranks that came with it}, the ranks ``missing`` at
    the deadline and those ``aside``; ``by``: the rank that published it."""

    tokens: dict[str, list[int]]
    missing: list[int]
    aside: list[int]
    by: int
    timed_out: bool

    @property
    def ok(self) -> bool:
        return len(self.tokens) == 1 and not self.missing and not self.aside

    def groups(self) -> list[tuple[str, list[int]]]:
        """(token, ranks), the most common token first."""
        return sorted(self.tokens.items(), key=lambda item: (-len(item[1]), item[1][0]))

    def to_json(self) -> str:
        return json.dumps({"tokens": {t: _ranges(r) for t, r in self.tokens.items()},
                           "missing": _ranges(self.missing), "aside": _ranges(self.aside),
                           "by": self.by, "timed_out": self.timed_out})

    @classmethod
    def from_json(cls, text) -> "Verdict":
        d = json.loads(text)
        return cls({t: _expand(r) for t, r in d["tokens"].items()}, _expand(d["missing"]),
                   _expand(d["aside"]), d["by"], d["timed_out"])


def ranks_key(ranks: list[int]) -> str:
    """A short key for a set of ranks (``w<count>-<hash>``): key names do not grow with it."""
    return f"w{len(ranks)}-{hashlib.sha1(','.join(map(str, sorted(ranks))).encode()).hexdigest()[:12]}"


def _ranges(ranks: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for r in sorted(set(ranks)):
        if out and out[-1][1] == r - 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return out


def _expand(ranges: list[list[int]]) -> list[int]:
    return [r for a, b in ranges for r in range(a, b + 1)]


def ranks_text(ranks: list[int], limit: int = 8) -> str:
    """``[0, 1, 2, 5, 7, 8]`` as "0-2, 5, 7-8": short whatever their number (at most ``limit`` runs,
    then how many more ranks)."""
    runs = _ranges(ranks)
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit])
    rest = sum(b - a + 1 for a, b in runs[limit:])
    return text + (f" and {rest} more" if rest else "")


def who(ranks: list[int]) -> str:
    """"rank 3", or "rank 3 (and 41 more alike: 5-9, 12-47)": one rank named, the others counted."""
    first, rest = ranks[0], ranks[1:]
    return f"rank {first}" + (f" (and {len(rest)} more alike: {ranks_text(rest)})" if rest else "")


def _escape(token: str) -> str:  # a token may hold any text (a host name, an error message)
    return token.replace("%", "%25").replace(";", "%3B")


def _parse_arrivals(text: str) -> dict[int, str]:
    came = {}
    for item in text.split(";"):
        if item:
            rank, _, token = item.partition("=")
            came[int(rank)] = token.replace("%3B", ";").replace("%25", "%")
    return came


def _parse_aside(text: str) -> list[int]:
    aside: set[int] = set()
    for item in text.split(";"):
        if item:
            (aside.add if item[0] == "+" else aside.discard)(int(item[1:]))
    return sorted(aside)


def _publish(store, place: str, rank: int, ranks: list[int], aside: Optional[str], aside_count: int,
             timed_out: bool) -> Verdict:
    """Decide the meeting from its arrivals (and who stands aside); the first claim wins. The
    winner then ``set``s the verdict: a ``compare_set`` wakes no ``wait`` on a TCPStore (torch 2.14,
    tried), a ``set`` does."""
    came = _parse_arrivals(store.get(f"{place}/arrivals").decode())
    away = _parse_aside(store.get(f"{aside}/log").decode()) if aside is not None and aside_count > 0 else []
    tokens: dict[str, list[int]] = {}
    for r in sorted(came):
        tokens.setdefault(came[r], []).append(r)
    members = set(ranks)
    missing = sorted(members - set(came) - set(away))
    mine = Verdict(tokens, missing, sorted(set(away) & (members - set(came))), rank, timed_out).to_json()
    claimed = store.compare_set(f"{place}/claim", "", mine).decode()
    if claimed == mine:
        store.set(f"{place}/verdict", mine)
    return Verdict.from_json(claimed)


def arrive(store, place: str, rank: int, token: str, ranks: list[int],
           aside: Optional[str] = None) -> Optional[Verdict]:
    """Come to the meeting at ``place`` with ``token`` without waiting (2 requests; 3 with
    ``aside``); the verdict where this arrival completed the meeting, else None."""
    return _arrive(store, place, rank, token, ranks, aside)[1]


def _arrive(store, place: str, rank: int, token: str, ranks: list[int],
            aside: Optional[str]) -> tuple[int, Optional[Verdict]]:
    store.append(f"{place}/arrivals", f"{rank}={_escape(token)};")
    count = int(store.add(f"{place}/count", 1))
    away = int(store.add(f"{aside}/count", 0)) if aside is not None and count < len(ranks) else 0
    if count + away >= len(ranks):
        return count, _publish(store, place, rank, ranks, aside, away, timed_out=False)
    return count, None


def meet(store, place: str, rank: int, token: str, ranks: list[int], timeout_s: float,
         aside: Optional[str] = None) -> Verdict:
    """Come to the meeting at ``place`` with ``token`` and wait, up to ``timeout_s`` seconds, for
    its verdict: every rank of ``ranks`` came (with which tokens), or, at the deadline, which did
    not. About five store requests.

    The first rank to come keeps the time: at its deadline it publishes the verdict, which wakes
    the others; they wait ``_GRACE_S`` longer before publishing it themselves (the first one died).
    On a libuv TCPStore, many waits that end by their timeout at once end seconds late (64 threads'
    2 s waits ended after 2, 7 and 12 s on this machine), while a ``set`` wakes every waiter at once."""
    stop = time.monotonic() + timeout_s
    count, verdict = _arrive(store, place, rank, token, ranks, aside)
    if verdict is not None:
        return verdict
    if count > 1:
        stop += _GRACE_S
    try:
        store.wait([f"{place}/verdict"], datetime.timedelta(seconds=max(stop - time.monotonic(), 0.001)))
    except RuntimeError:  # the deadline (DistStoreError, or FileStore's RuntimeError)
        away = int(store.add(f"{aside}/count", 0)) if aside is not None else 0
        return _publish(store, place, rank, ranks, aside, away, timed_out=True)
    return Verdict.from_json(store.get(f"{place}/verdict"))


_GRACE_S = 5.0  # how much longer than the first rank the others wait before deciding themselves


def next_meeting(store, series: str, rank: int) -> str:
    """The place of this rank's next meeting of ``series`` (``<series>/<i>``, i counted per rank in
    the store, so that a re-made process group, whose store is new, counts from 0): ranks that go
    through a series' meetings in the same order meet at the same places. One request."""
    return f"{series}/{int(store.add(f'{series}/of/{rank}', 1)) - 1}"


def peek_meeting(store, series: str, rank: int) -> str:
    """The place ``next_meeting`` would give this rank now, without taking it. One request."""
    return f"{series}/{int(store.add(f'{series}/of/{rank}', 0))}"


def stand_aside(store, aside: str, rank: int, place: str, ranks: list[int]) -> Optional[Verdict]:
    """This rank comes to no meeting of the series whose ``aside`` prefix this is until
    ``step_back_in``: a meeting whose other ranks all came is decided at once, naming it. ``place``:
    the meeting this rank would come to next (``peek_meeting``), decided here if its other ranks are
    already there. Three requests (seven if it decides)."""
    store.append(f"{aside}/log", f"+{rank};")
    away = int(store.add(f"{aside}/count", 1))
    count = int(store.add(f"{place}/count", 0))
    if count and count + away >= len(ranks):
        return _publish(store, place, rank, ranks, aside, away, timed_out=False)
    return None


def step_back_in(store, aside: str, rank: int) -> None:
    """End ``stand_aside`` (two requests)."""
    store.append(f"{aside}/log", f"-{rank};")
    store.add(f"{aside}/count", -1)
