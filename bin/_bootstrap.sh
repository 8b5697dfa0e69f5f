# Sourced by bin/serve and bin/test: make sure .venv exists and holds this project, idempotently.
#
# Rule: when the venv has no importable torch, install torch==2.13.0 *before* the project, so a
# CPU-only machine takes the local CPU wheel and never pulls the multi-GB CUDA build. An existing
# torch (e.g. a CUDA build on a GPU machine) is kept: never --upgrade it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.memserve-installed"
EXTRAS="${MEMSERVE_EXTRAS:-dev}"

say() { echo "[bootstrap] $*" >&2; }

if [ ! -x "$PY" ]; then
  PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  say "creating $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  say "no torch in the venv: installing torch==2.13.0 first (CPU wheel where configured)"
  "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi

want="$(cat "$ROOT/pyproject.toml" <(echo "extras=$EXTRAS") | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  say "installing memserve[$EXTRAS] (editable) into $VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check -e "$ROOT[$EXTRAS]" 2>&1 \
    | grep -v "is neither a file nor a directory" >&2 || true
  "$PY" -c "import memserve, torch" || { say "install failed"; exit 1; }
  echo "$want" > "$STAMP"
else
  say "$VENV is up to date"
fi
