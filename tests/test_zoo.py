"""Model zoo: what bnpass does to the training graph of 28 models (torchvision, timm, a U-Net), pinned in
tests/zoo/expected.csv, and the synced step against float64 on the global batch.

Default tier: the graph-level columns (bnpass_eager, a simulated 2-rank world, two worker
processes) of ``GRAPH_DEFAULT``, the kinds of graph no other default test covers; parity on 2 gloo ranks
(one image on one, three on the other) for resnet18 and mobilenet_v3_small under bnpass_eager. Slow
tier (``scripts/test.sh -m slow``): the graph-level columns of the other models, parity for every
model under bnpass_eager, and ``INDUCTOR_PARITY`` under Inductor, judged by tests/checks.py's rule
(each quantity within 3x eager float32's own error). The default tier keeps Inductor's side through
tests/test_sync.py, tests/test_agreement.py and tests/test_reliability.py
(numbers and collectives of conv nets compiled by Inductor, on real gloo ranks) and
tests/test_kernels.py (the generated code, site by site).
Regenerate the table with ``python -m tests.zoo [--parity] [--parity-inductor] --write`` and review the diff.
"""

from __future__ import annotations

import pytest
from torch import nn

from tests.checks import assert_counts
from tests.zoo import table
from tests.zoo.models import ZOO, ZooModel
from tests.zoo.parity import NOT_APPLICABLE, run_parity
from tests.zoo.sweep import graph_row, graph_rows

# Under Inductor, the models whose graphs differ in kind: residual blocks, squeeze-excitation,
# parallel branches packed (googlenet, inception_v3), dense concatenation, resolutions that meet again.
INDUCTOR_PARITY = ["resnet18", "mobilenet_v3_small", "googlenet", "inception_v3", "densenet121",
                   "timm/hrnet_w18_small"]
DEFAULT_PARITY = ["resnet18", "mobilenet_v3_small"]
# Two kinds of graph that the default parity run (resnet18's residual blocks whose downsample BN
# packs, mobilenet's squeeze-excitation: their counts and graph breaks are asserted against the
# table by ``_assert_parity``) and tests/test_sync.py (BatchNorm3d, F.batch_norm as timm's
# BatchNormAct2d calls it, LayerNorm/GroupNorm/InstanceNorm/FrozenBatchNorm2d left alone; the
# reliability tests, graph breaks outside BN) do not cover: parallel branches that pack many into
# one (googlenet). The other 23 models (r3d_18, timm's, the LayerNorm-only ones, fasterrcnn's
# FrozenBatchNorm2d with the model's own graph breaks...) are in the slow tier.
GRAPH_DEFAULT = ["googlenet"]
# The slow tier's graph-level run: the models the parity sweep cannot judge. For every other model
# the sweep asserts, from its real 2-rank compiles, the table's sites, synced sites, collectives
# packed and unpacked, and graph breaks (``_assert_parity``); a second compile of all 28 on the
# simulated world cost 5 to 8 minutes of the slow tier for the columns left (no FrozenBN, no error).
GRAPH_SLOW = [n for n in NOT_APPLICABLE if n not in GRAPH_DEFAULT]
REGENERATE = "python -m tests.zoo --write (then review the diff)"


@pytest.fixture(scope="module")
def rows():
    return {r["model"]: r for r in graph_rows(GRAPH_DEFAULT)}


@pytest.fixture(scope="module")
def slow_rows():
    return {r["model"]: r for r in graph_rows(GRAPH_SLOW)}


@pytest.fixture(scope="module")
def expected():
    found = table.read()
    assert found, f"{table.EXPECTED} is missing; create it with {REGENERATE}"
    return found


def test_the_zoo_is_the_table(expected):
    assert sorted(expected) == sorted(m.name for m in ZOO), \
        f"models in {table.EXPECTED} differ from the zoo: {REGENERATE}"
    assert set(GRAPH_DEFAULT) <= set(expected) and set(INDUCTOR_PARITY) <= set(expected)
    assert set(DEFAULT_PARITY) <= set(INDUCTOR_PARITY)


def _assert_graph_columns(rows: dict, expected: dict) -> None:
    old = table.render([{**expected[n], **table.graph_columns(rows[n])} for n in rows])
    new = table.render([expected[n] for n in rows])
    change = table.diff(new, old)
    assert not change, f"the zoo's graphs changed; if that is intended, {REGENERATE}:\n{change}"


def _assert_every_batchnorm_module_is_a_synced_site(rows: dict) -> None:
    for name, row in rows.items():
        assert row["error"] == "", f"{name}: {row['error']}"
        n = row["bn_modules"]
        want = {"sites": n, "synced": n, "local": 0, "skipped": 0, "fw_collectives_unpacked": n,
                "bw_collectives_unpacked": n}
        got = {k: row[k] for k in want}
        assert got == want, f"{name}: {got} != {want}"
        for direction in ("fw", "bw"):
            assert min(n, 1) <= row[f"{direction}_collectives"] <= n, f"{name}: {row}"
        if row["graph_breaks"]:  # the model's own (torchvision detection): stock Dynamo breaks as often
            assert row["graph_breaks"] == row["stock_graph_breaks"], f"{name}: {row}"
        else:
            assert row["stock_graph_breaks"] == "-"


def test_graph_columns_match_expected_csv(rows, expected):
    _assert_graph_columns(rows, expected)


def test_every_batchnorm_module_is_a_synced_site(rows):
    """Every BN module of every model syncs, once per direction before packing (after it, never
    more, and at least one where there is a BN); no graph break bnpass causes."""
    _assert_every_batchnorm_module_is_a_synced_site(rows)


@pytest.mark.slow
def test_graph_columns_of_the_models_parity_cannot_judge(slow_rows, expected):
    """The two checks above for the models without a parity verdict (fasterrcnn's losses)."""
    _assert_graph_columns(slow_rows, expected)
    _assert_every_batchnorm_module_is_a_synced_site(slow_rows)


@pytest.mark.slow
def test_a_frozen_batchnorm_model_has_no_synced_site(slow_rows):
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert slow_rows[name]["frozen_bn"] > 0
    assert slow_rows[name]["sites"] == slow_rows[name]["synced"] == slow_rows[name]["fw_collectives"] == 0, \
        slow_rows[name]


def _assert_parity(results: dict, names: list, expected: dict, column: str) -> None:
    for name in names:
        result = results[name]
        assert result["verdict"] == "pass", f"{name}: {result['verdict']} {result['detail']}"
        n = int(expected[name]["bn_modules"])
        assert_counts(result["per_rank"], sites=n, synced=n, forward=int(expected[name]["fw_collectives"]),
                      backward=int(expected[name]["bw_collectives"]), unpacked=(n, n))
        for rank in result["per_rank"]:  # the table's graph_breaks column, as the graph-level run counts
            assert rank["graph_breaks"] == int(expected[name]["graph_breaks"]), \
                f"{name}: {rank['graph_breaks']} graph breaks: {rank['graph_break_reasons']}"
        assert expected[name][column] == "pass", f"{table.EXPECTED} says {name}: {expected[name][column]}"


def test_core_models_match_float64(expected):
    """One synced training step on 2 gloo ranks (batches 1 and 3) against float64 on the global
    batch, for two of the core models (bnpass_eager: bnpass's graphs, without Inductor's codegen);
    counts from the compiled graphs; the verdicts the table records."""
    _assert_parity(run_parity(DEFAULT_PARITY, "bnpass_eager"), DEFAULT_PARITY, expected, "parity")


@pytest.mark.slow
def test_full_parity_sweep(expected):
    """Every model (bnpass_eager), with counts; the verdicts must be the table's."""
    names = [m.name for m in ZOO]
    results = run_parity(names, "bnpass_eager", deadline_s=3600)
    for name, result in results.items():
        want = NOT_APPLICABLE.get(name, "pass")
        assert result["verdict"] == want, f"{name}: {result['verdict']} {result['detail']}"
        assert expected[name]["parity"] == want, f"{table.EXPECTED} says {name}: {expected[name]['parity']}"
    _assert_parity(results, [n for n in names if n not in NOT_APPLICABLE], expected, "parity")


@pytest.mark.slow
def test_models_of_every_kind_match_float64_under_inductor(expected):
    """``INDUCTOR_PARITY`` under Inductor (cold compiles: minutes per model on 2 cores)."""
    _assert_parity(run_parity(INDUCTOR_PARITY, "bnpass", deadline_s=2 * 3600), INDUCTOR_PARITY, expected,
                   "parity_inductor")


def unbuildable():
    raise RuntimeError("this architecture needs a download")


class NeedsTwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, mask):
        return self.bn(x) * mask


def needs_two_inputs():
    return NeedsTwoInputs()


def test_a_model_that_cannot_be_built_or_run_is_a_row_with_the_reason():
    shape = (3, 8, 8)
    row = graph_row(ZooModel("broken", "test", unbuildable, shape))
    assert "RuntimeError: this architecture needs a download" in row["error"], row
    row = graph_row(ZooModel("two_inputs", "test", needs_two_inputs, shape))
    assert "missing 1 required positional argument: 'mask'" in row["error"], row
    assert row["sites"] == "" and row["bn_modules"] == 1


def test_table_round_trips(tmp_path):
    rows = [{**{c: "" for c in table.COLUMNS}, "model": m.name, "bn_modules": "3", "parity": "pass"}
            for m in ZOO[:3]]
    path = tmp_path / "zoo.csv"
    path.write_text(table.render(rows))
    assert list(table.read(path).values()) == rows
    assert table.diff(table.render(rows), table.render(rows[:2])).count("\n-") == 1
