"""Lower without Inductor: AOTAutograd's forward and backward graphs run op by op (eager ATen).

The ``bnpass_eager`` backend (``torch.compile(m, backend="bnpass_eager")``): the same capture, sites,
rewrite and collectives as ``bnpass``, with the generated code replaced by the graphs themselves, the
way Dynamo's ``aot_eager`` stands beside ``inductor``. It compiles in seconds where Inductor's C++
takes minutes, so it is what the model-zoo graph-level sweep uses, and a way to tell a bnpass bug
from an Inductor one. Its counts (collectives, host syncs) are read from the same AOTAutograd graphs
as under Inductor; only the kernels differ.
"""

from __future__ import annotations

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

from bnpass.schedule import save_site_collectives

from .inductor import agreeing, schedule_and_record

__all__ = ["lower"]


def lower(gm, example_inputs, options, record):
    """AOTAutograd with compilers that record each graph and return it to run as it is."""

    def compiler(direction):
        def compile_graph(graph_module, _example_inputs):
            schedule_and_record(record, graph_module, direction, options)
            return agreeing(make_boxed_func(graph_module.forward), record, direction, options)
        return compile_graph

    def partition(joint, *args, **kwargs):  # as Inductor's, after its joint pre-pass does this
        save_site_collectives(joint.graph)
        return min_cut_rematerialization_partition(joint, *args, **kwargs)

    with torch._functorch.config.patch(enable_autograd_cache=False):
        return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"),
                            partition_fn=partition)(gm, example_inputs)
