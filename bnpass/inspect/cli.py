"""The ``bnpass`` command line (also ``python -m bnpass``).

    bnpass inspect TARGET [--input-shape 8,3,224,224] [--eval] [--world-size 2]
                          [--group-size K|node [--ranks-per-node N]]
                          [--dtype float32|bfloat16|float16] [--channels-last]
                          [--format text|json|dot|html] [--output FILE] [--site K] [--kernels]

``inspect`` compiles TARGET with ``torch.compile(backend="bnpass")`` in this process, on a fake
process group of ``--world-size`` ranks (``--group-size``: the option group_size; with ``node``,
hosts of ``--ranks-per-node`` consecutive ranks), runs one training step on a seeded random input on the
model's device (forward, then backward of the sum of the outputs; ``--eval``: the forward only,
under ``no_grad``), and shows what the backend
recorded: which BatchNorms it synced, left local or skipped and why, the collectives in the compiled
graphs, graph breaks; ``--site K`` the Dynamo graph around site K before and after the rewrite;
``--kernels`` Inductor's generated code with the kernels that touch each site marked.

Exit status: 0 done (a model without BatchNorm is fine: zero sites); 1 the model's forward fails on
the input, or the compile fails; 2 bad input (TARGET, options, ``--site`` out of range).

JSON schema ``bnpass-inspect/1`` (``--format json``)::

    {
      "schema": "bnpass-inspect/1",
      "target": str, "mode": "train" | "eval", "world_size": int,
      "input_shape": [int], "dtype": str, "channels_last": bool,
      "backward": bool,            # whether the step ran a backward
      "graphs": int,               # graphs Dynamo compiled (graph breaks split a model)
      "sites": [{
        "index": int,              # position in this list, what --site takes
        "graph": int,              # the compiled graph the site is in
        "name": str,               # module path, or file:line of a functional call
        "op": str,                 # "nn.BatchNorm2d", "nn.SyncBatchNorm", "F.batch_norm", ...
        "channels": int | null, "dtype": str,
        "layout": "contiguous" | "channels_last" | "channels_last_3d" | "strided" | "unknown",
        "action": "sync" | "local" | "skip" | "fold",   # fold: eval BN folded into its conv
        "reason": str,
        "group": str | null,       # process group the statistics are reduced over (sync only)
        "kernels": {"forward": [str], "backward": [str]}      # with --kernels only
      }],
      "totals": {"sites": int, "sync": int, "local": int, "skip": int},  # + "fold": int when any
      "collectives": {             # counted in the graphs AOTAutograd handed to Inductor, after
        "forward": int, "backward": int,   # bnpass's schedule packed independent ones together
        "bytes_per_step": int,     # bytes of the all_reduce buffers per step, per rank
        "bytes": {"forward": int, "backward": int},
        "unpacked": {"forward": int, "backward": int},  # before packing: one per synced site
        "transport": {"forward" | "backward": {"process_group" | "shm": int}}  # collectives by transport
      },
      "sequence": [{               # every collective, in issue order per graph and direction
        "graph": int, "direction": "forward" | "backward", "position": int,
        "op": str, "numel": int | null, "dtype": str | null, "group": str | null,
        "transport": "process_group" | "shm",   # the fake group of inspect: always process_group
        "sites": [int]             # indices into "sites" that this (packed) collective serves
      }],
      "schedule": [{               # per compiled graph: what bnpass/schedule.py did
        "graph": int,
        "forward" | "backward": {"collectives_before": int, "collectives_after": int,
                                 "packed": [int],   # sizes of the packs of >= 2 collectives
                                 "split_conv_backwards": int, "reordered": bool}
      }],
      "graph_breaks": int,
      "site": {"index": int, "before": [str], "after": [str]},               # with --site only
      "kernels": [{"graph": int, "direction": "forward" | "backward", "source": str}]  # --kernels
    }
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

__all__ = ["main"]

FORMATS = ("text", "json", "dot", "html")
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("bnpass", "bnpass_eager")


class UsageError(ValueError):
    """Bad input found after argument parsing (exit status 2)."""


def _shape(text: str) -> tuple:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of sizes, e.g. 8,3,224,224")
    if not shape or any(n < 0 for n in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be >= 0")
    return shape


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnpass", description="bnpass: synced BatchNorm for torch.compile")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="inspect")
    p = verbs.add_parser(
        "inspect", help="compile a model with the bnpass backend and show what the pass did",
        description="Compile TARGET with backend='bnpass' on a simulated world of ranks, run one "
                    "training step, and show the BatchNorm sites, the collectives and the code.")
    p.add_argument("target", metavar="TARGET",
                   help="path/to/file.py:factory, package.module:factory, torchvision:NAME or timm:NAME")
    p.add_argument("--input-shape", type=_shape, default=(8, 3, 224, 224), metavar="N,C,...",
                   help="input shape of one rank's batch (default 8,3,224,224)")
    p.add_argument("--eval", action="store_true", help="eval mode: forward only, under no_grad")
    p.add_argument("--world-size", type=int, default=2, help="ranks of the simulated world (default 2)")
    p.add_argument("--group-size", type=_group_size, metavar="K|node",
                   help="the option group_size: statistics over consecutive groups of K ranks, or "
                        "over the ranks of each host ('node')")
    p.add_argument("--ranks-per-node", type=int, metavar="N",
                   help="with --group-size node: hosts of N consecutive ranks (default: one host)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model and input dtype")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input (4-D/5-D)")
    p.add_argument("--format", choices=FORMATS, default="text", help="output format (default text)")
    p.add_argument("--output", "-o", metavar="FILE", help="write there instead of stdout")
    p.add_argument("--site", type=int, metavar="K", help="show the graph around site K, before and after")
    p.add_argument("--kernels", action="store_true",
                   help="Inductor's generated code, kernels that touch each site marked")
    p.add_argument("--backend", choices=BACKENDS, default="bnpass",
                   help="bnpass (default): Inductor compiles the step; bnpass_eager: the same pass, "
                        "the graphs run op by op (compiles in seconds; no generated code)")
    return parser


def _group_size(text: str):
    return text if text == "node" else int(text)


def _check(args) -> None:
    if args.world_size < 1:
        raise UsageError(f"--world-size must be >= 1, got {args.world_size}")
    if args.ranks_per_node is not None and (args.group_size != "node" or args.ranks_per_node < 1):
        raise UsageError("--ranks-per-node N (N >= 1) goes with --group-size node")
    if args.channels_last and len(args.input_shape) not in (4, 5):
        raise UsageError(f"--channels-last needs a 4-D or 5-D --input-shape, got {list(args.input_shape)}")
    if args.site is not None and args.site < 0:
        raise UsageError(f"--site must be >= 0, got {args.site}")
    if args.kernels and args.backend != "bnpass":
        raise UsageError(f"--kernels shows Inductor's code; --backend {args.backend} generates none")


def render(data: dict, fmt: str, site: Optional[int], kernels: bool) -> str:
    if fmt == "json":
        from .render_json import render_json
        return render_json(data, site, kernels)
    if fmt in ("dot", "html"):
        from .render_graph import render_dot, render_html
        return (render_dot if fmt == "dot" else render_html)(data, site)
    from .render_text import render_text
    return render_text(data, site, kernels)


def _inspect(args) -> int:
    from .run import CompileError, ForwardError, InspectArgs, Progress, inspect_model
    from .target import FactoryError, TargetError

    _check(args)
    progress = Progress()
    spec = InspectArgs(target=args.target, input_shape=args.input_shape, eval=args.eval,
                       world_size=args.world_size, dtype=args.dtype, channels_last=args.channels_last,
                       kernels=args.kernels, backend=args.backend, group_size=args.group_size,
                       ranks_per_node=args.ranks_per_node)
    try:
        data = inspect_model(spec, progress)
    except TargetError as e:
        progress.done("stopped")
        print(e, file=sys.stderr)
        return 2
    except (ForwardError, CompileError, FactoryError) as e:
        progress.done("stopped")
        print(e, file=sys.stderr)
        return 1
    if args.site is not None and args.site >= len(data["sites"]):
        progress.done("stopped")
        count = len(data["sites"])
        raise UsageError(f"--site {args.site}: the model has {count} site(s)"
                         + (f", 0..{count - 1}" if count else ""))
    progress.stage(f"rendering {args.format}")
    text = render(data, args.format, args.site, args.kernels)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    progress.done(f"done: {len(data['sites'])} site(s)" + (f", written to {args.output}" if args.output else ""))
    return 0


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``bnpass`` console script; returns the exit status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        return int(e.code or 0)
    try:
        if args.verb == "inspect":
            return _inspect(args)
    except UsageError as e:
        print(f"bnpass: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
