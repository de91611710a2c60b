"""One process: no process group, a group of one rank, bad input, the backend's registration, and
the code Inductor generates for a synced site."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from tests.checks import assert_counts, assert_matches_reference
from tests.harness import run_ranks
from tests.models import Spec

CONVNET = Spec("convnet_ws1", "convnet", (5,), (3, 5, 5))
FORCED = Spec("convnet_forced", "convnet", (5,), (3, 5, 5), options=(("force_sync", True),))


@pytest.fixture(scope="module")
def one_rank():
    (result,) = run_ranks("tests.rank_jobs:single_rank_checks", 1, [CONVNET, FORCED])
    return result


def test_world_size_one_is_plain_bn(one_rank):
    """A group of one rank: every site local, no collective, plain BN's numbers."""
    assert_matches_reference([one_rank["convnet_ws1"]], CONVNET, 2e-5)
    assert_counts([one_rank["convnet_ws1"]], sites=4, synced=0, forward=0, backward=0)
    reasons = {s["reason"] for s in one_rank["convnet_ws1"]["records"][0]["sites"]}
    assert reasons == {"training mode, the process group has one rank (force_sync=False)"}


def test_force_sync_issues_the_collectives_on_one_rank(one_rank):
    assert_matches_reference([one_rank["convnet_forced"]], FORCED, 2e-5)
    assert_counts([one_rank["convnet_forced"]], sites=4, synced=4, forward=4, backward=4)


def test_destroyed_process_group_is_a_clear_error(one_rank):
    message = one_rank["destroyed_group_error"]
    assert message is not None and "bnpass: options['process_group'] was given but torch.distributed " \
        "is not initialised; call torch.distributed.init_process_group() first" in message


def test_no_process_group_is_plain_bn():
    (result,) = run_ranks("tests.rank_jobs:train_specs", 0, [CONVNET])
    result = result[CONVNET.name]
    assert_matches_reference([result], CONVNET, 2e-5)
    assert_counts([result], sites=4, synced=0, forward=0, backward=0)
    assert all("not initialised" in s["reason"] for s in result["records"][0]["sites"])


def test_backend_name_works_in_a_fresh_process_without_import():
    """The entry point registers "bnpass": no `import bnpass`, no duplicate-name assertion."""
    script = textwrap.dedent("""
        import json, sys, torch
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
        torch.compile(m, backend="bnpass")(torch.randn(2, 3, 4, 4)).sum().backward()
        records = sys.modules["bnpass"].compile_records()
        from torch._dynamo.backends.registry import lookup_backend
        assert lookup_backend("bnpass_eager") is sys.modules["bnpass"].bnpass_eager_backend
        print(json.dumps([r.to_json() for r in records]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (record,) = json.loads(out.stdout.strip().splitlines()[-1])
    assert [s["action"] for s in record["sites"]] == ["local"]
    assert record["collectives"] == {"forward": 0, "backward": 0}


def _fused_kernels(code: str) -> set[str]:
    return set(re.findall(r"cpp_fused_\w+", code))


def test_inductor_fuses_bn_with_its_neighbours():
    """Forward: normalize + residual add + ReLU in one kernel after the statistics kernel.
    Backward: ReLU's backward fused into the [sum dy, sum dy*xhat] reduction. Checked without
    bnpass's overlap and with Inductor's peak-memory reordering on, as in a stock compile (the
    fusion is Inductor's); with bnpass's defaults (overlap, no peak-memory reordering: it could
    reorder collectives), the same fused kernels, and at most one more per direction (the exact
    count per site against stock Inductor is tests/test_kernels.py's)."""
    plain, = run_ranks("tests.rank_jobs:generated_code", 0,
                       {"overlap": False, "inductor_config": {"reorder_for_peak_memory": True}})
    default, = run_ranks("tests.rank_jobs:generated_code", 0)
    for code, extra in ((plain, 0), (default, 1)):
        forward, backward = _fused_kernels(code["forward"]), _fused_kernels(code["backward"])
        assert any("var_mean" in k for k in forward), forward
        assert any("rsqrt" in k and "relu" in k and "add" in k for k in forward), forward
        assert any("threshold_backward" in k and "sum" in k for k in backward), backward
        assert len(forward) <= 3 + extra and len(backward) <= 3 + extra, (forward, backward)
        assert "all_reduce" in code["forward"] and "all_reduce" in code["backward"]
        assert_counts([{**code, "graph_breaks": 0}], sites=1, synced=1, forward=1, backward=1)


def _compile_and_run(model, x, **kw):
    torch._dynamo.reset()
    return torch.compile(model, backend="bnpass", **kw)(x)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(Exception, match=r"bnpass: unknown option\(s\) \['procces_group'\]. Valid "
                                        r"options are process_group: .*force_sync: .*inductor_config"):
        _compile_and_run(nn.BatchNorm2d(3), torch.randn(2, 3, 4, 4), options={"procces_group": None})


@pytest.mark.parametrize("options, message", [
    ({"force_sync": 1}, "bnpass: option force_sync must be a bool, got int"),
    ({"process_group": "world"}, "bnpass: option process_group must be a torch.distributed.ProcessGroup, got str"),
    ({"inductor_config": 3}, "bnpass: option inductor_config must be a dict"),
])
def test_options_of_the_wrong_type(options, message):
    with pytest.raises(Exception, match=re.escape(message)):
        _compile_and_run(nn.BatchNorm2d(3), torch.randn(2, 3, 4, 4), options=options)


@pytest.mark.parametrize("module, shape", [
    (nn.BatchNorm1d(3), (2, 3, 4, 4)), (nn.BatchNorm2d(3), (2, 3, 4)), (nn.BatchNorm3d(3), (2, 3, 4, 4)),
])
def test_wrong_input_rank_gives_pytorchs_error(module, shape):
    x = torch.randn(shape)
    with pytest.raises(ValueError) as eager:
        module(x)
    with pytest.raises(ValueError, match=re.escape(str(eager.value))):
        _compile_and_run(module, x)
