#!/usr/bin/env bash
# Run every notebook in notebooks/ under strict nbval (or, with --refresh, re-execute them and store outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
shopt -s nullglob
notebooks=(notebooks/*.ipynb)
if [ ${#notebooks[@]} -eq 0 ]; then
  echo ">> nbval: no notebooks yet"
  exit 0
fi
if [ "${1:-}" = "--refresh" ]; then
  for nb in "${notebooks[@]}"; do
    echo ">> executing $nb"
    "$VENV/bin/jupyter" nbconvert --to notebook --execute --inplace \
      --ExecutePreprocessor.store_widget_state=False --ExecutePreprocessor.timeout=1200 "$nb"
  done
  exit 0
fi
"$VENV/bin/python" -m pytest -p no:cacheprovider --nbval --nbval-current-env \
  --nbval-sanitize-with notebooks/sanitize.cfg "${notebooks[@]}"
