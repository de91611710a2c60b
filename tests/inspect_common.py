"""What the ``bnpass inspect`` tests share: the repository, the golden files, the CLI's models
(tests/cli_models.py) and the runs whose JSON is pinned in tests/golden/.

Golden files are rewritten with ``BNPASS_UPDATE_GOLDEN=1`` (then read the diff: they are the
reviewed expectations).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnpass.inspect.cli import main

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
def run_from_repo(monkeypatch):
    """TARGETs name files relative to the repository."""
    monkeypatch.chdir(REPO)


def portable(data: dict) -> dict:
    """The JSON with this checkout's path replaced (a functional site is named by file:line)."""
    return json.loads(json.dumps(data).replace(str(REPO), "<repo>"))


def golden(name: str) -> dict:
    return json.loads((GOLDEN / f"inspect_{name}.json").read_text())


def run_json(tmp_path, argv: list) -> dict:
    out = tmp_path / "out.json"
    assert main(["inspect", *argv, "--format", "json", "--output", str(out)]) == 0
    return json.loads(out.read_text())
