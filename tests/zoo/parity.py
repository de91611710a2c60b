"""Model-zoo parity: one synced training step on 2 gloo ranks (per-rank batches 2 and 3) under
``backend="bnpass"`` (Inductor) against the float64 model on the global batch of 5, judged as
PyTorch's model accuracy checks judge (RMSE against float64, relative to eager's own RMSE:
tests/checks.py ``rmse_verdict``): outputs, loss gradient w.r.t. the input, parameter gradients
summed over ranks, running statistics on every rank.
"""

from __future__ import annotations

from tests.checks import rmse_verdict
from tests.harness import RankFailure, run_ranks
from tests.models import Spec
from tests.zoo.models import BY_NAME

SIZES = (2, 3)
# A rank whose peer failed to compile stops waiting for it after this long (bnpass agree_timeout_s).
AGREE_TIMEOUT_S = 60.0
# Models whose step has no per-sample output to compare: the parity column says why.
NOT_APPLICABLE = {
    "fasterrcnn_mobilenet_v3_large_320_fpn":
        "n/a: training losses of the whole batch with sampled proposals, and no synced BatchNorm",
}


def spec(name: str, backend: str = "bnpass") -> Spec:
    return Spec(f"zoo:{name}", f"zoo:{name}", SIZES, BY_NAME[name].sample_shape, steps=1,
                options=(("agree_timeout_s", AGREE_TIMEOUT_S),), backend=backend)


def run_parity(names: list[str], backend: str = "bnpass", deadline_s: float = 900.0) -> dict[str, dict]:
    """name -> {"verdict": "pass" | "FAIL" | "error: ..." | "n/a: ...", "detail": str,
    "per_rank": the ranks' results or None}, running every applicable model in one 2-rank job
    under ``backend`` ("bnpass": Inductor; "bnpass_eager": the same graphs without codegen)."""
    out = {n: {"verdict": NOT_APPLICABLE[n], "detail": "", "per_rank": None}
           for n in names if n in NOT_APPLICABLE}
    specs = {n: spec(n, backend) for n in names if n not in NOT_APPLICABLE}
    if not specs:
        return out
    try:
        results = run_ranks("tests.rank_jobs:train_specs_reporting_errors", 2, list(specs.values()),
                            deadline_s=deadline_s)
    except RankFailure as failure:  # a rank died outright: every model of the job reports it
        reason = str(failure).splitlines()[1][:200] if "\n" in str(failure) else str(failure)
        return {**out, **{n: {"verdict": f"error: {reason}", "detail": "", "per_rank": None} for n in specs}}
    for name, s in specs.items():
        per_rank = [r[s.name] for r in results]
        errors = [r["error"] for r in per_rank if "error" in r]
        if errors:
            out[name] = {"verdict": f"error: {errors[0]}", "detail": "", "per_rank": per_rank}
            continue
        passed, detail = rmse_verdict(per_rank, s)
        out[name] = {"verdict": "pass" if passed else "FAIL", "detail": detail, "per_rank": per_rank}
    return out
