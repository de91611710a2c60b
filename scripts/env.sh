# Sourced by scripts/demo.sh and scripts/test.sh: a venv in .venv with bnpass and its pinned deps.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BNPASS_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import bnpass, torchvision, timm, lightning, accelerate, pytest" 2>/dev/null; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[test]"
fi
export PATH="$VENV/bin:$PATH"
# Compiled graphs are cached here between runs (Inductor's FX graph cache).
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}"
cd "$ROOT"
