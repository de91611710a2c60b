"""What each rank runs (imported by name in the spawned processes; see tests/harness.py)."""

from __future__ import annotations

import torch
import torch._dynamo

import bnpass
from tests.models import Spec, memory_format
from tests.training import train


def graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def compile_and_train(spec: Spec, rank: int, group=None) -> dict:
    """Train ``spec`` on this rank under torch.compile(backend=spec.backend); results and records.
    ``group``: the process group whose ranks share the spec's global batch (``rank`` is this rank's
    place in it) and sum gradients; default: the default group."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    model = spec.build()
    if spec.memory_format != "contiguous":
        model = model.to(memory_format=memory_format(spec.memory_format))
    options = dict(spec.options)
    if options.get("process_group") == "new_group":  # a group of all ranks, not the default one
        options["process_group"] = torch.distributed.new_group(list(range(torch.distributed.get_world_size())))
    ddp = None
    if spec.ddp == "outer":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        compiled = torch.compile(ddp, backend=spec.backend, options=options, **dict(spec.compile_kwargs))
    else:
        compiled = torch.compile(model, backend=spec.backend, options=options, **dict(spec.compile_kwargs))
        if spec.ddp == "inner":
            compiled = ddp = torch.nn.parallel.DistributedDataParallel(compiled)
    out = train(spec, model, compiled, rank, ddp, group=group)
    out["records"] = [r.to_json() for r in bnpass.compile_records()]
    out["graph_breaks"] = graph_breaks()
    out["graph_break_reasons"] = {k[:400]: v for k, v in torch._dynamo.utils.counters["graph_break"].items()}
    return out


def train_specs(rank: int, world_size: int, specs: list) -> dict:
    return {spec.name: compile_and_train(spec, rank) for spec in specs}


def train_specs_reporting_errors(rank: int, world_size: int, specs: list) -> dict:
    """As train_specs, but a spec that raises gives {"error": first line} and the next one runs
    (the model zoo: one model that fails to compile is a row, not a failed job)."""
    out = {}
    for spec in specs:
        try:
            out[spec.name] = compile_and_train(spec, rank)
        except Exception as e:  # noqa: BLE001 - reported in the zoo CSV
            from tests.zoo.sweep import error_line

            out[spec.name] = {"error": error_line(e)}
    return out


def fold_eval_checks(rank: int, world_size: int, spec: Spec) -> dict:
    """Eval-mode folding (world size 0: no group needed): outputs in eval, the parameters after it,
    a training step in between, eval again; the same model with fold_eval=False."""
    out = {}
    for fold in (True, False):
        torch._dynamo.reset()
        bnpass.clear_records()
        model = spec.build().eval()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        compiled = torch.compile(model, backend="bnpass", options={"fold_eval": fold})
        x = spec.batch(0)
        with torch.no_grad():
            first = compiled(x)
        unchanged = all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        model.train()  # training resumes (eagerly), then eval again on the updated parameters
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(spec.batch(1)).square().sum().backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            again = compiled(x)
        out[fold] = {"first": first, "again": again, "unchanged": unchanged,
                     "state_after": {k: v.clone() for k, v in model.state_dict().items()},
                     "records": [r.to_json() for r in bnpass.compile_records()],
                     "graph_breaks": graph_breaks()}
    return out


def single_rank_checks(rank: int, world_size: int, specs: list) -> dict:
    """World size 1: the specs, then a compile against a process group that was destroyed."""
    import torch.distributed as dist

    out = train_specs(rank, world_size, specs)
    group = dist.new_group([0])
    dist.destroy_process_group()
    torch._dynamo.reset()
    model = specs[0].build()
    try:
        torch.compile(model, backend="bnpass", options={"process_group": group})(
            specs[0].batch(0))
        out["destroyed_group_error"] = None
    except Exception as e:  # noqa: BLE001 - the test reads the message
        out["destroyed_group_error"] = str(e)
    return out


def generated_code(rank: int, world_size: int, options: dict | None = None) -> dict:
    """One process, a fake 2-rank group: Inductor's code for a conv-BN-add-ReLU training step."""
    import torch.distributed as dist
    from torch._inductor.utils import run_and_get_code
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tests.models import ResidualBlock

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    bnpass.clear_records()
    compiled = torch.compile(ResidualBlock(), backend="bnpass", options=options)
    x = torch.randn(4, 4, 6, 6, requires_grad=True)

    def step():
        compiled(x).sum().backward()

    _, (forward, backward) = run_and_get_code(step)
    return {"forward": forward, "backward": backward,
            "records": [r.to_json() for r in bnpass.compile_records()]}


def cache_probe(rank: int, world_size: int, spec: Spec, backend: str, options: dict) -> dict:
    """One training step under ``backend``; with Inductor's cache counters of this process."""
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    model = spec.build()
    kwargs = {"options": options} if options else {}
    compiled = torch.compile(model, backend=backend, **kwargs)
    out = train(spec, model, compiled, rank)
    out["cache"] = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()
                    if k in ("inductor", "aot_autograd")}
    out["records"] = [r.to_json() for r in bnpass.compile_records()]
    return out


def scheduled_graphs(rank: int, world_size: int, model: str, shape: tuple, variants: dict) -> dict:
    """One training step of ``model`` (a tests/models.py factory) on torch's fake group of 2 ranks,
    under ``bnpass_eager``, once per options dict of ``variants``: per variant, the graph's record,
    the digests of its scheduled forward and backward graphs, the schedule's reports, and the
    step's output and gradients (bnpass/schedule.py; tests/test_schedule.py)."""
    import dataclasses

    from bnpass.inspect.run import fake_world
    from tests.models import factory

    out = {}
    with fake_world(2):
        for name, options in variants.items():
            torch._dynamo.reset()
            bnpass.clear_records()
            torch.manual_seed(0)
            net = factory(model)()
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
            y = torch.compile(net, backend="bnpass_eager", options=options)(x)
            y.square().sum().backward()
            (record,) = bnpass.compile_records()
            out[name] = {
                "record": record.to_json(), "graphs": record.graphs,
                "schedules": {d: dataclasses.asdict(r) for d, r in record.schedules.items()},
                "output": y.detach(), "grads": {"input": x.grad, **{n: p.grad for n, p in net.named_parameters()}},
            }
    return out
