"""Which specs of a multi-rank job compile with Inductor in the default tier.

Inductor's C++ builds are most of the default tier's time on 2 cores, and every rank builds its own
(uneven batches: other shapes). So in the default tier a job compiles with Inductor only the specs
whose subject is Inductor's code (layouts, dtypes, packed collectives in the generated wrapper, the
1e4 stability in its float64 code, DDP, dynamic shapes, checkpointing); the others run on
``bnpass_eager``: the same capture, sites, rewrite, schedule, agreement and AOTAutograd graphs,
executed without codegen, judged by the same assertions. The slow tier (``-m slow``) runs every
spec as written, through Inductor.
"""

from __future__ import annotations

import dataclasses

import pytest

# Parameters of a job's module fixture: each test of the module runs once per tier.
TIERS = ["default", pytest.param("inductor", marks=pytest.mark.slow)]


def specs_for(tier: str, specs: list, inductor_in_default: set) -> list:
    """``specs`` as the tier runs them (see the module's docstring)."""
    assert inductor_in_default <= {s.name for s in specs}, inductor_in_default
    if tier == "inductor":
        return list(specs)
    return [s if s.name in inductor_in_default or s.backend != "bnpass"
            else dataclasses.replace(s, backend="bnpass_eager") for s in specs]
