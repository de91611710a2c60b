"""``bnpass inspect`` as a command: output to stdout and files, exit codes and messages for bad
input, the console script and ``python -m bnpass`` (as subprocesses)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bnpass.inspect.cli import main
from tests.inspect_common import GOLDEN_RUNS, MODELS, REPO, golden, portable, run_from_repo  # noqa: F401


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
    # a bnpass_eager run (tests/test_inspect_golden.py compares Inductor's "tiny" with its golden)
    proc = subprocess.run(_script() + ["inspect", *GOLDEN_RUNS["tiny_world_size_1"], "--format", "json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert portable(json.loads(proc.stdout)) == golden("tiny_world_size_1")
    assert "rendering json" in proc.stderr


def test_python_m_bnpass_bad_input_exit_2():
    proc = subprocess.run([sys.executable, "-m", "bnpass", "inspect", "missing.py:f"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line and not line.startswith("[bnpass inspect")]
    assert lines == ["bnpass: no file missing.py; TARGET must be path/to/file.py:factory, "
                     "package.module:factory, torchvision:NAME or timm:NAME"]
