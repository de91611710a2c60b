"""``bnpass inspect`` output formats, on one Inductor compile of tests/cli_models.py's ``tiny`` with
``--kernels``: the text table, the site's graph before and after the rewrite, kernels marked by
site, dot clusters by phase, the self-contained html page."""

from __future__ import annotations

import copy
import html.parser
import json
import re

import pytest

from bnpass.inspect.render_graph import PHASES, build_graph, render_dot, render_html
from bnpass.inspect.render_json import render_json
from bnpass.inspect.render_text import render_text
from bnpass.inspect.run import InspectArgs, Progress, inspect_model
from tests.inspect_common import MODELS, golden, portable, run_from_repo  # noqa: F401


@pytest.fixture(scope="module")
def tiny_kernels() -> dict:
    args = InspectArgs(target=f"{MODELS}:tiny", input_shape=(2, 3, 6, 6), kernels=True)
    return inspect_model(args, Progress(every=0))


def test_kernels_run_records_the_same_decisions(tiny_kernels):
    data = json.loads(render_json(tiny_kernels))
    assert portable(data) == golden("tiny")


def test_text_table_and_totals(tiny_kernels):
    text = render_text(tiny_kernels)
    rows = [line for line in text.splitlines() if re.match(r"^\d+\s", line)]
    assert len(rows) == len(tiny_kernels["sites"]) == 4
    for row, site in zip(rows, tiny_kernels["sites"]):
        assert row.split()[0] == str(site["index"]) and site["action"] in row.split() and row.endswith(site["reason"])
    c = tiny_kernels["collectives"]
    assert "sites: 4 (sync 3, local 0, skip 1) in 1 compiled graph" in text
    assert f"forward {c['forward']}, backward {c['backward']}" in text
    assert f"per rank: {c['bytes_per_step']:,} " in text
    assert "graph breaks: 0" in text


def test_site_before_and_after_the_rewrite(tiny_kernels):
    """bn2 (momentum=None): the tag and F.batch_norm before; synced_batch_norm fed 1/num_batches after."""
    text = render_text(tiny_kernels, site=1)
    section = text[text.index("site 1: bn2"):]
    before, after = section.split("after the rewrite:")
    marked_before = [line for line in before.splitlines() if line.startswith("  > ")]
    assert len(marked_before) == 2
    assert "bnpass.bn_site" in marked_before[0] and "torch.nn.functional.batch_norm" in marked_before[1]
    marked_after = [line for line in after.splitlines() if line.startswith("  > ")]
    assert len(marked_after) == 1 and "bnpass.ops.synced_batch_norm" in marked_after[0]
    assert "torch.reciprocal" in after and "bn_site" not in after
    site = json.loads(render_json(tiny_kernels, site=1))["site"]
    assert site["index"] == 1 and site["before"] == tiny_kernels["sites"][1]["before"]


def test_each_collective_and_its_transport(tiny_kernels):
    """Text and JSON list every collective with its transport: the record's sequence (3 synced sites:
    3 + 3 all_reduces, each serving one site), the fake group's process_group; an entry whose
    record says shm (a same-host run; inspect's fake group cannot take it) is shown as shm."""
    data = json.loads(render_json(tiny_kernels))
    entries = data["sequence"]
    assert [(e["direction"], e["position"], e["transport"], e["numel"], e["dtype"]) for e in entries] == \
        [("forward", i, "process_group", 9, "float64") for i in range(3)] + \
        [("backward", i, "process_group", 8, "float64") for i in range(3)]  # CPU: float64 sums
    assert sorted(s for e in entries if e["direction"] == "forward" for s in e["sites"]) == [0, 1, 2]
    assert data["collectives"]["transport"] == {"forward": {"process_group": 3}, "backward": {"process_group": 3}}
    text = render_text(tiny_kernels)
    assert "transport: forward 3 process_group, backward 3 process_group (the fake process group" in text
    rows = [line.split() for line in text.splitlines() if re.match(r"^\s+\d+\s+0\s+(forward|backward)\s", line)]
    assert [(r[2], r[3], r[7]) for r in rows] == [(e["direction"], "all_reduce(sum)", "process_group") for e in entries]
    same_host = copy.deepcopy(tiny_kernels)
    same_host["graphs"][0]["sequence"]["backward"][1]["transport"] = "shm"
    text = render_text(same_host)
    assert "backward 2 process_group + 1 shm" in text and "fake process group has no" not in text
    assert json.loads(render_json(same_host))["sequence"][4]["transport"] == "shm"


def _call_marks(source: str) -> list[tuple[str, str, str]]:
    """(provenance handle, bnpass mark, call line) for every marked kernel call of a marked source."""
    lines = [line.strip() for line in source.splitlines()]
    return [(lines[i - 1].split("] ", 1)[1], line, lines[i + 1]) for i, line in enumerate(lines)
            if line.startswith("# bnpass: touches") and lines[i - 1].startswith("# [Provenance debug handles]")]


def test_kernels_marked_by_site(tiny_kernels):
    data = json.loads(render_json(tiny_kernels, kernels=True))
    by_direction = {k["direction"]: k["source"] for k in data["kernels"]}
    assert set(by_direction) == {"forward", "backward"}
    for direction in ("forward", "backward"):
        marks = _call_marks(by_direction[direction])
        # a mark sits between a call's provenance comment and the call it names
        assert marks and all(handle.rsplit(":", 1)[0] + "(" in call for handle, _, call in marks)
        all_reduces = [mark for _, mark, call in marks if call.startswith("torch.ops._c10d_functional.all_reduce_")]
        # each all_reduce call in the generated code is marked with exactly the one site it reduces for
        assert len(all_reduces) == data["collectives"][direction] == 3
        touched = [re.findall(r"site (\d+)", mark) for mark in all_reduces]
        assert sorted(int(t[0]) for t in touched) == [0, 1, 2] and all(len(t) == 1 for t in touched)
        assert all("[all_reduce]" in mark for mark in all_reduces)
    for site in data["sites"]:
        if site["action"] == "sync":
            assert any("all_reduce" in k for k in site["kernels"]["forward"])
            assert any("all_reduce" in k for k in site["kernels"]["backward"])
    # the skipped eval BN has kernels (its normalization) but no collective
    skipped = data["sites"][3]
    assert skipped["kernels"]["forward"] and not any("all_reduce_" in k for k in skipped["kernels"]["forward"])
    text = render_text(tiny_kernels, kernels=True)
    assert "==== graph 0 forward: Inductor's generated code ====" in text
    assert text.count("# bnpass: touches") == sum(s.count("# bnpass: touches") for s in by_direction.values())


def _clusters(dot: str) -> list[str]:
    return re.findall(r'subgraph "(cluster_[^"]+)"', dot)


def test_dot_clusters_each_site_by_phase(tiny_kernels):
    dot = render_dot(tiny_kernels)
    assert dot.startswith("digraph bnpass {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    clusters = _clusters(dot)
    for site in tiny_kernels["sites"]:
        i = site["index"]
        want = ({"stats", "all_reduce", "normalize"} if site["action"] == "sync" else {"normalize"})
        fw = {c.rsplit("_site", 1)[1].split("_", 1)[1] for c in clusters
              if c.startswith(f"cluster_g0_forward_site{i}_")}
        assert fw == want, (i, fw)
        bw = {c.rsplit("_site", 1)[1].split("_", 1)[1] for c in clusters
              if c.startswith(f"cluster_g0_backward_site{i}_")}
        assert bw == ({"all_reduce", "backward"} if site["action"] == "sync" else {"backward"}), (i, bw)
        assert re.search(rf'label="site {i}: .*\({site["action"]}\)";', dot)
    # the all_reduce clusters hold the graphs' collectives, and nothing else
    g = build_graph(tiny_kernels)
    reduces = [n for n, a in g.nodes(data=True) if a["target"] == "_c10d_functional.all_reduce"]
    assert len(reduces) == tiny_kernels["collectives"]["forward"] + tiny_kernels["collectives"]["backward"]
    assert all(g.nodes[n]["phase"] == "all_reduce" and g.nodes[n]["site"] is not None for n in reduces)
    assert len(re.findall(r"->", dot)) == g.number_of_edges()


def test_dot_site_filter(tiny_kernels):
    dot = render_dot(tiny_kernels, site=2)
    sites_drawn = {int(m) for m in re.findall(r"cluster_g0_\w+?_site(\d+)\"", dot)}
    assert sites_drawn == {2}
    assert len(re.findall(r"->", dot)) < len(re.findall(r"->", render_dot(tiny_kernels)))


class _Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.counts, self.attrs, self.problems = [], {}, [], []

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        self.attrs.append((tag, dict(attrs)))
        if tag not in ("meta", "br", "rect", "path", "marker"):
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        self.attrs.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in ("rect", "path", "marker"):
            return
        if not self.stack or self.stack.pop() != tag:
            self.problems.append(tag)


def test_html_is_one_self_contained_file(tiny_kernels):
    page = render_html(tiny_kernels)
    tags = _Tags()
    tags.feed(page)
    assert not tags.problems and not tags.stack, (tags.problems, tags.stack)
    # nothing fetched: no script, stylesheet link, image or remote url
    assert "script" not in tags.counts and "link" not in tags.counts and "img" not in tags.counts
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "@import" not in page
    # a sites table row per site, and each site's boxes in the overview, by phase
    assert sum(1 for tag, a in tags.attrs if tag == "tr" and a.get("id", "").startswith("site-")) == 4
    boxes = {(int(a["data-site"]), a["data-phase"]) for tag, a in tags.attrs if tag == "g" and "data-site" in a}
    for site in tiny_kernels["sites"]:
        phases = {p for s, p in boxes if s == site["index"]}
        assert phases == ({"stats", "all_reduce", "normalize", "backward"} if site["action"] == "sync"
                          else {"normalize", "backward"}), (site["index"], phases)
    assert set(p for _, p in boxes) <= set(PHASES)
    assert tags.counts["svg"] >= 2 + 2 * len(tiny_kernels["sites"])  # marker defs, 2 overviews, details
