"""``bnpass inspect``: golden JSON for the models of tests/cli_models.py, every format, bad input,
and the collective counts against a compiled, really-synced 2-rank gloo run of the same models.

Most runs call ``bnpass.inspect.cli.main(argv)`` in this process (compiles are shared through the Inductor
cache); the console script and ``python -m bnpass`` run as subprocesses. Golden files are rewritten
with ``BNPASS_UPDATE_GOLDEN=1`` (then read the diff: they are the reviewed expectations).
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bnpass.inspect.cli import main
from bnpass.inspect.run import InspectArgs, Progress, inspect_model
from bnpass.inspect.render_graph import PHASES, build_graph, render_dot, render_html
from bnpass.inspect.render_json import SCHEMA, render_json
from bnpass.inspect.render_text import render_text
from tests.harness import run_ranks

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
MODELS = "tests/cli_models.py"
SHAPE = "2,3,6,6"

# (golden file, argv after TARGET): each is one compile. "tiny" is compiled by Inductor (the CLI's
# default); the others by bnpass_eager (the same pass and record, no C++ to build: seconds, not
# minutes; the JSON has nothing of the generated code), which test_eager_backend_... checks on "tiny".
FAST = ["--backend", "bnpass_eager"]
GOLDEN_RUNS = {
    "tiny": [f"{MODELS}:tiny", "--input-shape", SHAPE],
    "tiny_eval_flag": [f"{MODELS}:tiny", "--input-shape", SHAPE, "--eval", *FAST],
    "tiny_world_size_1": [f"{MODELS}:tiny", "--input-shape", SHAPE, "--world-size", "1", *FAST],
    "tiny_eval_factory": ["tests.cli_models:tiny_eval", "--input-shape", SHAPE, *FAST],
    "broken": [f"{MODELS}:broken", "--input-shape", "2,3,4,4", "--world-size", "3", *FAST],
    "tiny_bf16_channels_last": [f"{MODELS}:tiny", "--input-shape", SHAPE, "--dtype", "bfloat16",
                                "--channels-last", *FAST],
}


@pytest.fixture(autouse=True)
def _run_from_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _portable(data: dict) -> dict:
    """The JSON with this checkout's path replaced (a functional site is named by file:line)."""
    return json.loads(json.dumps(data).replace(str(REPO), "<repo>"))


def _run_json(tmp_path, argv: list) -> dict:
    out = tmp_path / "out.json"
    assert main(["inspect", *argv, "--format", "json", "--output", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def golden_runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("golden")
    return {name: _run_json(tmp, argv) for name, argv in GOLDEN_RUNS.items()}


@pytest.mark.parametrize("name", sorted(GOLDEN_RUNS))
def test_golden_json(golden_runs, name):
    got = _portable(golden_runs[name])
    path = GOLDEN / f"inspect_{name}.json"
    if os.environ.get("BNPASS_UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=2) + "\n")
    assert got == json.loads(path.read_text())


def test_golden_runs_say_what_each_case_means(golden_runs):
    """What the golden files pin down, stated: decisions per mode and world size, graph breaks."""
    tiny = golden_runs["tiny"]
    assert tiny["schema"] == SCHEMA and tiny["mode"] == "train" and tiny["backward"]
    assert [s["action"] for s in tiny["sites"]] == ["sync", "sync", "sync", "skip"]
    assert [s["op"] for s in tiny["sites"]] == ["nn.BatchNorm2d", "nn.BatchNorm2d", "F.batch_norm", "nn.BatchNorm2d"]
    assert tiny["collectives"]["forward"] == tiny["collectives"]["backward"] == 3
    assert tiny["totals"] == {"sites": 4, "sync": 3, "local": 0, "skip": 1}

    # eval mode: the modules' BN normalize with running statistics, folded into the conv before
    # them (the last one follows a BN, not a conv: skipped); the functional call passes
    # training=True itself, so it still computes (and syncs) batch statistics
    for name in ("tiny_eval_flag", "tiny_eval_factory"):
        run = golden_runs[name]
        assert run["mode"] == "eval" and [s["action"] for s in run["sites"]] == ["fold", "fold", "sync", "skip"]
        assert run["collectives"]["forward"] == 1
    assert not golden_runs["tiny_eval_flag"]["backward"]  # --eval: forward only, under no_grad
    assert golden_runs["tiny_eval_flag"]["collectives"]["backward"] == 0
    assert golden_runs["tiny_eval_factory"]["backward"]  # an eval model as given still runs a backward
    assert golden_runs["tiny_eval_factory"]["collectives"]["backward"] == 1

    local = golden_runs["tiny_world_size_1"]
    assert [s["action"] for s in local["sites"]] == ["local", "local", "local", "skip"]
    assert local["collectives"]["bytes_per_step"] == 0

    half = golden_runs["tiny_bf16_channels_last"]
    assert {(s["dtype"], s["layout"]) for s in half["sites"]} == {("bfloat16", "channels_last")}
    assert half["collectives"]["bytes"] == tiny["collectives"]["bytes"]  # statistics stay float32/64

    broken = golden_runs["broken"]
    assert broken["graphs"] == 2 and broken["graph_breaks"] == 1
    assert [(s["index"], s["graph"], s["name"]) for s in broken["sites"]] == [(0, 0, "bn_a"), (1, 1, "bn_b")]
    assert "3 rank(s)" in broken["sites"][0]["reason"]
    # bn_a normalizes the model's input, which needs no gradient: no dx, so no backward collective
    assert broken["collectives"]["forward"] == 2 and broken["collectives"]["backward"] == 1


def test_collectives_match_a_real_two_rank_run(golden_runs):
    """The CLI (fake group, one process) against the same models compiled on 2 gloo ranks."""
    jobs = {"tiny": ((2, 3, 6, 6), "tiny"), "broken": ((2, 3, 4, 4), "broken")}
    per_rank = run_ranks("tests.cli_models:rank_jobs", 2, {k: v for k, v in jobs.items()}, deadline_s=600)
    for name in jobs:
        cli = golden_runs[name]
        for rank in per_rank:
            real = rank[name]
            records = real["records"]
            assert real["graph_breaks"] == cli["graph_breaks"]
            assert len(records) == cli["graphs"]
            real_sites = [(s["name"], s["action"]) for r in records for s in r["sites"]]
            assert real_sites == [(s["name"], s["action"]) for s in cli["sites"]]
            for direction in ("forward", "backward"):
                assert sum(r["collectives"][direction] for r in records) == cli["collectives"][direction]
                assert sum(r["collective_bytes"][direction] for r in records) == cli["collectives"]["bytes"][direction]
            assert sum(r["collective_bytes"]["forward"] + r["collective_bytes"]["backward"]
                       for r in records) == cli["collectives"]["bytes_per_step"]


def test_eager_backend_finds_and_counts_the_same(golden_runs, tmp_path):
    """``--backend bnpass_eager`` (no Inductor): the same sites, decisions and collectives."""
    fast = _run_json(tmp_path, GOLDEN_RUNS["tiny"] + FAST)
    tiny = golden_runs["tiny"]
    assert [(s["name"], s["action"], s["reason"]) for s in fast["sites"]] == \
        [(s["name"], s["action"], s["reason"]) for s in tiny["sites"]]
    assert fast["collectives"] == tiny["collectives"] and fast["graph_breaks"] == tiny["graph_breaks"]


# --- one compile with --kernels, rendered in every format -----------------------------------------

@pytest.fixture(scope="module")
def tiny_kernels() -> dict:
    args = InspectArgs(target=f"{MODELS}:tiny", input_shape=(2, 3, 6, 6), kernels=True)
    return inspect_model(args, Progress(every=0))


def test_kernels_run_records_the_same_decisions(tiny_kernels):
    data = json.loads(render_json(tiny_kernels))
    assert _portable(data) == json.loads((GOLDEN / "inspect_tiny.json").read_text())


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


# --- the command line itself ----------------------------------------------------------------------

def test_text_and_html_to_file_through_main(tmp_path, capsys):
    """The default format on stdout with progress on stderr; html written with --output."""
    assert main(["inspect", f"{MODELS}:no_bn", "--input-shape", "2,3,6,6"]) == 0
    out, err = capsys.readouterr()
    assert "no BatchNorm found" in out and "sites: 0 (sync 0, local 0, skip 0)" in out
    assert "collectives per training step: forward 0, backward 0" in out
    assert re.search(r"\[bnpass inspect +\d+\.\ds\] compiling and running the forward", err)
    assert re.search(r"\[bnpass inspect +\d+\.\ds\] done: 0 site\(s\)", err)
    page = tmp_path / "no_bn.html"
    assert main(["inspect", f"{MODELS}:no_bn", "--input-shape", "2,3,6,6", "--format", "html",
                 "-o", str(page)]) == 0
    assert page.read_text().startswith("<!DOCTYPE html>") and capsys.readouterr().out == ""
    dot = tmp_path / "no_bn.dot"
    assert main(["inspect", f"{MODELS}:no_bn", "--input-shape", "2,3,6,6", "--format", "dot",
                 "-o", str(dot), "--site", "0"]) == 2  # zero sites: there is no site 0
    assert "--site 0: the model has 0 site(s)" in capsys.readouterr().err


def test_forward_failing_on_the_shape_exits_1(capsys):
    assert main(["inspect", f"{MODELS}:tiny", "--input-shape", "2,5,6,6"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "fails on input shape [2, 5, 6, 6] (float32): RuntimeError:" in err and "channels" in err


BAD_TARGETS = {
    "no colon": ("resnet18", "cannot read TARGET 'resnet18'"),
    "missing file": ("tests/no_such_file.py:tiny", "no file tests/no_such_file.py"),
    "missing factory": (f"{MODELS}:nope", f"{MODELS} has no factory 'nope'"),
    "missing module": ("tests.no_such_module:tiny", "cannot import 'tests.no_such_module'"),
    "unknown torchvision": ("torchvision:resnet5", "torchvision has no model 'resnet5' (did you mean"),
    "not a module": (f"{MODELS}:not_a_module", "returned int, not an nn.Module"),
}


@pytest.mark.parametrize("case", sorted(BAD_TARGETS))
def test_bad_target_exits_2_with_the_accepted_forms(case, capsys):
    target, problem = BAD_TARGETS[case]
    assert main(["inspect", target]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[bnpass inspect")]
    assert len(err) == 1 and problem in err[0]
    assert err[0].endswith("TARGET must be path/to/file.py:factory, package.module:factory, "
                           "torchvision:NAME or timm:NAME")


def test_timm_target(capsys):
    """Without timm: a clear one-line error (exit 2); with it, an unknown name is one too."""
    assert main(["inspect", "timm:no_such_model_xyz"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[bnpass inspect")]
    try:
        import timm  # noqa: F401
        assert "timm has no model 'no_such_model_xyz'" in err[0]
    except ImportError:
        assert "timm:no_such_model_xyz needs timm, which is not installed (pip install timm)" in err[0]


@pytest.mark.parametrize("argv, problem", [
    (["--world-size", "0"], "--world-size must be >= 1"),
    (["--channels-last", "--input-shape", "2,3"], "--channels-last needs a 4-D or 5-D --input-shape"),
    (["--format", "svg"], "invalid choice: 'svg'"),
    (["--input-shape", "2,x"], "is not a comma-separated list of sizes"),
    (["--kernels", "--backend", "bnpass_eager"], "--kernels shows Inductor's code"),
])
def test_bad_options_exit_2(argv, problem, capsys):
    assert main(["inspect", f"{MODELS}:tiny", *argv]) == 2
    assert problem in capsys.readouterr().err


def test_factory_that_raises_exits_1(capsys):
    assert main(["inspect", f"{MODELS}:raises"]) == 1
    assert "raised RuntimeError: this factory fails on purpose" in capsys.readouterr().err


def _script() -> list[str]:
    exe = Path(sys.executable).parent / "bnpass"
    found = str(exe) if exe.exists() else shutil.which("bnpass")
    if found is None:
        pytest.skip("the bnpass console script is not installed (pip install -e .)")
    return [found]


def test_console_script_json_matches_golden(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(_script() + ["inspect", *GOLDEN_RUNS["tiny"], "--format", "json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert _portable(json.loads(proc.stdout)) == json.loads((GOLDEN / "inspect_tiny.json").read_text())
    assert "rendering json" in proc.stderr


def test_python_m_bnpass_bad_input_exit_2():
    proc = subprocess.run([sys.executable, "-m", "bnpass", "inspect", "missing.py:f"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line and not line.startswith("[bnpass inspect")]
    assert lines == ["bnpass: no file missing.py; TARGET must be path/to/file.py:factory, "
                     "package.module:factory, torchvision:NAME or timm:NAME"]
