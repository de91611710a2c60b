"""Model-zoo parity: one synced training step on 2 gloo ranks (per-rank batches 1 and 3: one sample on
a rank) under ``backend="bnpass"`` (Inductor) or ``"bnpass_eager"`` against the float64 model on the
global batch of 4, judged by tests/checks.py's rule (each quantity within 3x eager float32's own
error on the same global batch, or ``TOL`` of its floored scale): outputs, loss gradient w.r.t. the
input, parameter gradients summed over ranks, running statistics on every rank.

The zoo's inputs (tests/zoo/models.py) are where eager float32 is close to float64 (a median error
of 1e-6 to 5e-5 over a model's quantities): 64x64 images (the last stage of a /32 network at 2x2),
where 32x32 with 4 or 5 images left RegNet's and ResNet-50's last stages so ill-conditioned that
eager's median error was 1.4e-4 to 2.6e-4; inception_v3 at 107x107 (its last stage at 2x2);
mobilenet_v2 at 80x80, because at 64x64 one pre-activation sits 1.7e-6 from zero against float32
errors of 1e-5 in that layer, and which float32 run flips it is rounding luck (docs/testing.md).
"""

from __future__ import annotations

from tests.checks import verdict
from tests.harness import RankFailure, run_ranks
from tests.models import Spec
from tests.zoo.models import BY_NAME

SIZES = (1, 3)
TOL = 2e-5  # as the other multi-rank tests
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
        passed, detail = verdict(per_rank, s, TOL)
        out[name] = {"verdict": "pass" if passed else "FAIL", "detail": detail, "per_rank": per_rank}
    return out
