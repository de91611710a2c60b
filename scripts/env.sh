# Sourced by scripts/demo.sh and scripts/test.sh: a venv in .venv with bnpass and its pinned deps.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BNPASS_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# (Re)install when the venv lacks a distribution (read from its metadata: importing torch takes
# seconds), or pyproject.toml / constraints.txt changed since the last install into it from here
# (a moved console script or a new package would be stale otherwise).
STAMP="$VENV/.bnpass-install"
WANT="$ROOT $(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] \
        || ! "$VENV/bin/python" -c "import importlib.metadata as m
for d in ('bnpass', 'torch', 'torchvision', 'timm', 'lightning', 'accelerate', 'mmengine-lite',
          'opencv-python-headless', 'matplotlib', 'pytest'): m.version(d)" 2>/dev/null; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[test]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# Compiled graphs are cached here between runs (Inductor's FX graph cache).
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}"
cd "$ROOT"
