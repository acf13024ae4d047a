#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv: torch first, pinned by constraints.txt, then
# infkit with its dev extra. Re-running is cheap: a stamp keyed by the install inputs skips pip.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found. Install Python >= 3.10 (Debian: apt-get install -y python3 python3-venv)." >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/tmp/infkit-venv-err.txt; then
    cat /tmp/infkit-venv-err.txt >&2
    rm -rf "$VENV"
    echo "error: '$PYTHON -m venv' does not work here. On Debian/Ubuntu fix it with:" >&2
    echo "    apt-get install -y python3-venv" >&2
    exit 1
  fi
fi

stamp_inputs=$(cat pyproject.toml constraints.txt; echo "$TORCH_SPEC $EXTRAS")
stamp_hash=$(printf '%s' "$stamp_inputs" | sha256sum | cut -c1-16)
stamp="$VENV/.infkit-installed-$stamp_hash"
if [ -f "$stamp" ]; then
  exit 0
fi

echo ">> setting up $VENV (torch first: $TORCH_SPEC)"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $TORCH_SPEC
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$EXTRAS]"
"$VENV/bin/python" - <<'PY'
import torch, os
if os.environ.get("INFKIT_ALLOW_CUDA_TORCH") != "1":
    assert not torch.version.cuda, f"expected the CPU torch build, got CUDA {torch.version.cuda}"
print(f">> torch {torch.__version__} (cuda: {torch.version.cuda})")
PY
rm -f "$VENV"/.infkit-installed-*
touch "$stamp"
