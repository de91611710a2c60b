"""DDP's ``Join`` with bnpass: ranks out of batches answer the others' BatchNorm collectives.

    with Join([bnpass.Joinable(ddp_model), ddp_model]):   # bnpass's entry first
        for x in this_ranks_batches:
            ...

A rank that has joined answers each step the others still run with zero-count contributions
(n = 0, Σ = 0: what an empty batch sends), so the statistics are those of the ranks still training
and nobody waits in a BatchNorm collective. How:

* **What a step issues.** Every call of a compiled graph is noted (``agree.on_call``: its
  collective sequence, bnpass/schedule.py ``collective_sequence``, with each collective's
  transport); a forward pre-hook on the DDP module begins a new step. A joined rank answers each
  step of the others with the collectives of the last step it ran itself, in order: zeros of each
  one's size and dtype, through the transport each one used (``bnpass.shm_all_reduce`` or the
  process group). The sequence does not depend on the batch size, and a model of several compiled
  graphs (graph breaks) runs all of them per step.
* **A group of its own.** On active ranks the backward's BatchNorm all_reduces run interleaved with
  DDP's bucket all_reduces; a joined rank answers them one hook after the other. So the statistics
  travel over a group of the same ranks as DDP's, made here (``dist.new_group``, once per process
  and DDP group), and every bnpass compile from then on reduces over it in place of DDP's
  (bnpass/groups.py ``stand_in``; ``Options.group``). It is made at construction, which every rank
  runs alike before the training loop: at the first compile a rank with no batch would never make
  it. Its name is in the compiled graphs, so the agreement (bnpass/agree.py) and the cache keys see
  it like any group.
* **First in the list.** Join runs the hooks in list order. On a joined rank DDP's hook broadcasts
  the buffers (what the active ranks do before their forward) and waits for the gradient buckets
  (which the active ranks issue only after their forward's statistics). So bnpass's hook goes
  first and issues its answers without waiting for them (a thread; waited for at the next step and
  at the end). Only the first joinable announces "not joined yet" (``Join.notify_join_context``):
  the pre-hook does that, as DDP does when it is first, and hands the work to DDP's reducer, so
  ``divide_by_initial_world_size=False`` still divides by the ranks still training.
* **A rank that never ran a step** of the model cannot know what to answer: at each Join's first
  step the ranks meet in the store (bnpass/meet.py), and such a rank raises a ``BNPassError`` that
  the others raise too, at once, instead of waiting. A joined rank also stands aside in the
  agreement (bnpass/agree.py ``stand_aside``): a graph with other collectives, compiled by the
  others after it joined, is an error on them at once instead of after ``agree_timeout_s``.

Running statistics: the active ranks' are updated from the statistics of the ranks still training.
A joined rank's own are not updated by the steps it answers; DDP's ``broadcast_buffers=True`` (its
default) copies the buffers to every rank at each step and its post-hook copies the last joiner's
parameters and buffers to every rank, so after the ``with`` block every rank holds the same ones.
With ``broadcast_buffers=False`` a joined rank keeps the buffers it had when it joined.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join, JoinHook
from torch.distributed.algorithms.join import Joinable as _TorchJoinable

from . import agree
from .errors import BNPassError
from .groups import make_stand_in, stand_in_names
from . import meet

__all__ = ["Joinable"]

_PREFIX = "bnpass/join"
_ASIDE = ("has joined (DDP's Join: it ran out of batches) and answers the collectives of the last step "
          "it ran; this graph, compiled since, issues others, which it cannot answer. Under Join, "
          "steps after a rank joined must run graphs with the collectives of the steps before (a "
          "recompile for another batch size has the same)")
_STEP, _NO_STEP = "step", "no-step"  # what a rank brings to a Join's first step
_WHY_NO_STEP = ("joined without having run a training step of this model in this process, so it cannot "
                "know which BatchNorm collectives to answer: give every rank at least one batch in its "
                "first Join (DistributedSampler with drop_last=False gives every rank the same number); "
                "a rank that ran a step under an earlier Join answers with that step's collectives")
_ALL_REDUCE = str(torch.ops._c10d_functional.all_reduce.default)


class _Steps:
    """One DDP model's steps in this process: how many began, and the collective sequences of the
    graphs run since the last one began (kept across the Joinables made for the model)."""

    def __init__(self):
        self.begun = 0
        self.current: list[list[dict]] = []


class _Log:
    """What every compiled graph's run is noted into: the steps of the model whose step runs."""

    def __init__(self):
        self.joinable = None  # the Joinable whose model began the latest step
        self.checked: dict[int, list] = {}  # id -> sequence: those a joined rank could answer
        self.contexts = 0  # Join contexts made in this process (the same count on every rank)

    def note(self, sequence: list[dict], direction: str) -> None:
        joinable = self.joinable
        if joinable is None:
            return
        joinable._steps.current.append(sequence)
        if id(sequence) not in self.checked and joinable._join_config.enable:
            _check(sequence, direction)
            self.checked[id(sequence)] = sequence


_LOG = _Log()
_BY_MODULE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # DDP module -> its Joinable


def _check(sequence: list[dict], direction: str) -> None:
    """Raise (on every rank alike: the same graphs) if a joined rank could not answer ``sequence``."""
    for c in sequence:
        what = f"{c['target']}({c['op']}) of {c['numel']} {c['dtype']} over group {c['group']} " \
               f"in a compiled {direction} graph"
        if c["target"] != _ALL_REDUCE or c["op"] != "sum" or c["numel"] is None:
            raise BNPassError(f"bnpass: under Join, a joined rank answers each collective with zeros, "
                              f"which only a sum can take; this model issues {what}")
        if c["transport"] == "process_group" and c["group"] not in stand_in_names():
            raise BNPassError(
                f"bnpass: under Join, {what} (sites {c['sites']}) goes through the process group "
                f"{c['group']}, which DDP uses too: a joined rank could not answer it in order. "
                "Make bnpass.Joinable(ddp_model) before the model's first call (then bnpass "
                "reduces over a group of its own), or torch._dynamo.reset() after making it; "
                "BatchNorms of their own process_group, group_size or nn.SyncBatchNorm's group are "
                "not supported under Join.")


class Joinable(_TorchJoinable):
    """``Join([bnpass.Joinable(ddp_model), ddp_model])``: bnpass's BatchNorm collectives under DDP's
    Join. ``ddp_model``: the ``DistributedDataParallel`` module (around the compiled model:
    ``DDP(torch.compile(model, backend="bnpass"))``). Make it on every rank before the model's
    first call; ``timeout_s``: how long the ranks wait for each other at a Join's first step.
    ``answered``: {"steps", "collectives"} this rank answered while joined."""

    def __init__(self, ddp_model: torch.nn.Module, timeout_s: float = 300.0):
        super().__init__()
        if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
            raise BNPassError(
                f"bnpass.Joinable takes the DistributedDataParallel module, got "
                f"{type(ddp_model).__name__}: ddp_model = DDP(torch.compile(model, backend='bnpass')); "
                "Join([bnpass.Joinable(ddp_model), ddp_model])")
        if ddp_model.process_group != dist.group.WORLD:
            raise BNPassError("bnpass.Joinable supports DDP over the default process group only (it "
                              "makes a group of the same ranks, which every rank must make alike)")
        self._ddp = ddp_model
        self.group = make_stand_in(ddp_model.process_group)
        self._ranks = dist.get_process_group_ranks(ddp_model.process_group)
        self.timeout_s = timeout_s
        self.answered = {"steps": 0, "collectives": 0}
        self._context = self._met = self._joined = -1
        self._aside = None
        self._steps_in_context = 0
        self._thread, self._error = None, None
        previous = _BY_MODULE.get(ddp_model)
        if previous is None:
            ddp_model.register_forward_pre_hook(_step_begins)
        self._steps = previous._steps if previous is not None else _Steps()
        _BY_MODULE[ddp_model] = self
        agree.on_call(_LOG.note)

    def join_hook(self, **kwargs) -> JoinHook:
        _LOG.contexts += 1
        self._context, self._steps_in_context = _LOG.contexts, 0
        return _Hook(self)

    @property
    def join_device(self) -> torch.device:
        return self._ddp.join_device

    @property
    def join_process_group(self):
        return self._ddp.join_process_group

    # On an active rank, before each forward.
    def _begin_step(self) -> None:
        self._check_first()
        self._steps.begun += 1
        self._steps.current = []
        _LOG.joinable = self
        self._steps_in_context += 1
        work = Join.notify_join_context(self)  # first: a rank that joined waits for it
        if self._join_config.enable and self._met != self._context:
            self._met = self._context
            self._meet_at_start()
        if work is not None:
            self._ddp.reducer._set_forward_pass_work_handle(
                work, getattr(self._ddp, "_divide_by_initial_world_size", True))

    def _check_first(self) -> None:
        """Raise (on every rank: each begins a step or joins first) unless this Joinable leads its Join."""
        if self._join_config.enable and not self._join_config.is_first_joinable:
            raise BNPassError(
                "bnpass: bnpass.Joinable must come first in the Join list: Join([bnpass.Joinable("
                "ddp_model), ddp_model, ...]). A joined rank runs the hooks in list order, and DDP's "
                "waits for gradient buckets that the others issue only after the BatchNorm "
                "statistics that bnpass's hook answers.")

    def _meet_at_start(self) -> None:
        verdict = meet.meet(_store(), self._start(), dist.get_rank(), _STEP, self._ranks, self.timeout_s)
        if verdict.ok:
            return
        if _NO_STEP in verdict.tokens:
            raise BNPassError(f"bnpass: {meet.who(verdict.tokens[_NO_STEP])} {_WHY_NO_STEP}")
        raise BNPassError(f"bnpass: rank(s) {meet.ranks_text(verdict.missing)} of the {len(self._ranks)} "
                          f"ranks did not begin the first step under Join within {self.timeout_s:.0f} s "
                          "(bnpass.Joinable's timeout_s): dead, still busy elsewhere, or not in this Join")

    def _start(self) -> str:
        """Where the ranks meet at this Join's first step."""
        return f"{_PREFIX}/start/{self._context}"

    # On a joined rank, once per step of the others.
    def _answer_step(self) -> None:
        self._check_first()
        self._wait()
        if self._joined != self._context:
            self._joined = self._context
            if self._steps_in_context == 0:
                self._joined_before_any_step()
            self._aside = agree.stand_aside(_ASIDE, self._ranks)
        sequences = list(self._steps.current)
        self._thread = threading.Thread(target=self._answer, args=(sequences,), daemon=True,
                                        name="bnpass-join")
        self._thread.start()
        self.answered["steps"] += 1
        self.answered["collectives"] += sum(len(s) for s in sequences)

    def _joined_before_any_step(self) -> None:
        """This Join's first step: come to the others' meeting (bnpass/meet.py), or tell them why not."""
        if self._steps.begun:  # an earlier Join's last step says what to answer
            meet.arrive(_store(), self._start(), dist.get_rank(), _STEP, self._ranks)
            return
        meet.arrive(_store(), self._start(), dist.get_rank(), _NO_STEP, self._ranks)
        raise BNPassError(f"bnpass: rank {dist.get_rank()} {_WHY_NO_STEP}")

    def _answer(self, sequences: list[list[dict]]) -> None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        try:
            if self.join_device.type == "cuda":  # the current device is per thread (not tried)
                torch.cuda.set_device(self.join_device)
            for sequence in sequences:
                for c in sequence:
                    zeros = torch.zeros(c["numel"], dtype=getattr(torch, c["dtype"]), device=self.join_device)
                    if c["transport"] == "shm":
                        torch.ops.bnpass.shm_all_reduce(zeros, "sum", c["group"])
                    else:
                        dist.all_reduce(zeros, group=_resolve_process_group(c["group"]))
        except BaseException as e:  # noqa: BLE001 - raised again on the main thread (_wait)
            self._error = e

    def _wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise BNPassError(f"bnpass: a joined rank's answer to the BatchNorm collectives failed: "
                              f"{error}") from error


def _store():
    return dist.distributed_c10d._get_default_store()


def _step_begins(module, args) -> None:
    _BY_MODULE[module]._begin_step()


class _Hook(JoinHook):
    def __init__(self, joinable: Joinable):
        self.joinable = joinable

    def main_hook(self) -> None:
        self.joinable._answer_step()

    def post_hook(self, is_last_joiner: bool) -> None:
        joinable = self.joinable
        if joinable._joined == joinable._context:
            agree.step_back_in(joinable._aside)
        _LOG.joinable = None  # until the model's next step: nothing else is noted into its steps
        joinable._wait()
