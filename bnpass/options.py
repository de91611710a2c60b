"""Options of the bnpass backend: ``torch.compile(m, backend="bnpass", options={...})``."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch.distributed as dist

from .errors import BNPassError
from .groups import NODE, check_group_size, group_of_node, group_of_size, stand_in

__all__ = ["Options", "BNPassError", "GroupChoice"]


_DOC = {
    "process_group": "ProcessGroup to reduce statistics over (default: the default group)",
    "group_size": "int k: statistics over consecutive groups of k ranks of the default group (ranks "
                  "0..k-1, k..2k-1, ...); k must divide the world size, 1 means local statistics; "
                  "'node': over the ranks of each host (every host must run as many)",
    "force_sync": "bool: issue the collective even on a one-rank group (a benchmarking aid)",
    "inductor_config": "dict of torch._inductor.config patches for this compile",
    "fold_eval": "bool (default True): fold an eval-mode BatchNorm into the Conv/Linear before it",
    "pack_collectives": "bool (default True): BatchNorms whose statistics do not depend on each other "
                        "share one all_reduce per direction",
    "overlap": "bool (default True): issue each all_reduce as soon as its payload is ready and wait "
               "for it as late as possible (convolution backwards split into input and weight parts)",
    "transport": "'auto' (default): bnpass's all_reduces go through shared memory where every rank "
                 "of the group is on this host and the tensors are on the CPU, else the process group; "
                 "'process_group': always the process group",
    "agree_timeout_s": "seconds a rank waits for the others to compile the same BatchNorms (300)",
    "kernels": "'inductor' (default): Inductor generates the BN kernels; 'triton': bnpass's Triton "
               "kernels for synced CUDA sites (an error elsewhere); 'auto': per site by a shape rule "
               "(not yet measured on a GPU), inductor where triton cannot run",
}

KERNELS = ("inductor", "triton", "auto")
TRANSPORTS = ("auto", "process_group")


@dataclasses.dataclass(frozen=True)
class GroupChoice:
    """The group the sites of one compile reduce over; ``name`` None means no collective."""

    name: Optional[str]
    world_size: int
    why_local: str


@dataclasses.dataclass(frozen=True)
class Options:
    process_group: Any = None
    group_size: Optional[int | str] = None
    force_sync: bool = False
    inductor_config: dict = dataclasses.field(default_factory=dict)
    agree_timeout_s: float = 300.0
    kernels: str = "inductor"
    fold_eval: bool = True
    pack_collectives: bool = True
    overlap: bool = True
    transport: str = "auto"
    mode: Optional[str] = None

    @classmethod
    def from_user(cls, options: Optional[dict] = None, mode: Optional[str] = None) -> "Options":
        options = dict(options or {})
        unknown = sorted(set(options) - set(_DOC))
        if unknown:
            valid = "; ".join(f"{k}: {v}" for k, v in _DOC.items())
            raise BNPassError(f"unknown option(s) {unknown}. Valid options are {valid}.")
        opts = cls(mode=mode, **options)
        for flag in ("force_sync", "fold_eval", "pack_collectives", "overlap"):
            if not isinstance(getattr(opts, flag), bool):
                raise BNPassError(f"option {flag} must be a bool, got {type(getattr(opts, flag)).__name__}")
        if isinstance(opts.agree_timeout_s, bool) or not isinstance(opts.agree_timeout_s, (int, float)) \
                or not opts.agree_timeout_s > 0:
            raise BNPassError(f"option agree_timeout_s must be a positive number of seconds, got "
                              f"{opts.agree_timeout_s!r}")
        if not isinstance(opts.kernels, str) or opts.kernels not in KERNELS:
            raise BNPassError(f"option kernels must be one of {', '.join(map(repr, KERNELS))}, got "
                              f"{opts.kernels!r}")
        if not isinstance(opts.transport, str) or opts.transport not in TRANSPORTS:
            raise BNPassError(f"option transport must be one of {', '.join(map(repr, TRANSPORTS))} "
                              f"('auto': shared memory between ranks on this host, else the process "
                              f"group), got {opts.transport!r}")
        if not isinstance(opts.inductor_config, dict):
            raise BNPassError("option inductor_config must be a dict of torch._inductor.config names")
        if "post_grad_custom_post_pass" in opts.inductor_config:
            raise BNPassError("inductor_config may not set post_grad_custom_post_pass: bnpass uses it "
                              "to key Inductor's caches")
        if opts.process_group is not None and not isinstance(opts.process_group, dist.ProcessGroup):
            raise BNPassError(f"option process_group must be a torch.distributed.ProcessGroup, got "
                              f"{type(opts.process_group).__name__}; create one with "
                              "torch.distributed.new_group(...)")
        if opts.group_size is not None:
            check_group_size(opts.group_size, node=True)
            if opts.process_group is not None:
                raise BNPassError(
                    "options process_group and group_size were both given: pass one. group_size=k "
                    "splits the default group into consecutive groups of k ranks; to split another "
                    "group, make its subgroups with torch.distributed.new_subgroups(k, group=...) "
                    "and pass this rank's as process_group.")
        return opts

    def group(self) -> GroupChoice:
        """Resolve the process group now (at compile time, on this rank); where a
        ``bnpass.Joinable`` made a group of the same ranks for bnpass's collectives, that one."""
        choice = self._group()
        other = stand_in(choice.name)
        return choice if other is None else GroupChoice(other.group_name, choice.world_size, choice.why_local)

    def _group(self) -> GroupChoice:
        initialised = dist.is_available() and dist.is_initialized()
        if self.process_group is not None:
            if not initialised:
                raise BNPassError("options['process_group'] was given but torch.distributed is not "
                                  "initialised; call torch.distributed.init_process_group() first")
            return GroupChoice(self.process_group.group_name, dist.get_world_size(self.process_group), "")
        if self.group_size is not None:
            return self._subgroup(initialised)
        if not initialised:
            return GroupChoice(None, 1, "torch.distributed is not initialised: nothing to sync with")
        world = dist.group.WORLD
        return GroupChoice(world.group_name, dist.get_world_size(world), "")

    def _subgroup(self, initialised: bool) -> GroupChoice:
        """``group_size``: this rank's group of consecutive ranks, made or reused (bnpass.groups)."""
        if not initialised:
            raise BNPassError(f"option group_size={self.group_size} was given but torch.distributed "
                              "is not initialised; call torch.distributed.init_process_group() first "
                              "(or leave group_size out for this rank's own statistics)")
        if self.group_size == 1 and not self.force_sync:  # force_sync: one-rank groups, synced
            return GroupChoice(None, 1, "group_size=1: this rank's own statistics, no collective")
        if self.group_size == NODE:
            group = group_of_node(dist.group.WORLD, self.agree_timeout_s, self.force_sync)
            if group is None:
                return GroupChoice(None, 1, "group_size='node': this rank is alone on its host, its own "
                                            "statistics, no collective")
            return GroupChoice(group.group_name, dist.get_world_size(group), "")
        group = group_of_size(self.group_size, dist.group.WORLD, self.agree_timeout_s)
        return GroupChoice(group.group_name, dist.get_world_size(group), "")

    def fingerprint(self) -> str:
        """What of these options changes generated code (the group's name is in the graph itself,
        and so is group_size's: its group's name, or no collective for group_size=1)."""
        kernels = "" if self.kernels == "inductor" else f";kernels={self.kernels}"
        fold = "" if self.fold_eval else ";fold_eval=False"
        pack = "" if self.pack_collectives else ";pack_collectives=False"
        overlap = "" if self.overlap else ";overlap=False"
        transport = "" if self.transport == "auto" else f";transport={self.transport}"
        return (f"force_sync={self.force_sync};inductor_config={sorted(self.inductor_config.items())!r}"
                f"{kernels}{fold}{pack}{overlap}{transport}")
