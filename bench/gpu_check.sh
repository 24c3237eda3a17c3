#!/usr/bin/env bash
# GPU check of the presets on CUDA (bench/gpu_check.py): every stage's bf16 training steps, data-parallel
# over all visible GPUs, sampling; volumes/s, fraction of the measured bf16 matmul peak, peak memory.
# About 5 minutes on one H100 (budget 450 s, then what is left is skipped). Without CUDA it runs the
# `tiny` preset on the CPU instead, so that it stays runnable.
#
#   bash bench/gpu_check.sh [--short] [--presets small,paper] [--no-compile]     (from the repository root)
#
# It installs nothing from the internet. Python: $PYTHON, else .venv/bin/python, else python3. This
# checkout's code is used whether or not the project is pip-installed; the packages it needs must be
# importable, or lie as wheels in $WHEELS (default .whl/), which are then installed with --no-index into a
# temporary folder (the environment itself is not changed).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# What bench/gpu_check.py imports beyond the standard library (module name=distribution name).
NEEDED="torch=torch numpy=numpy monai=monai nibabel=nibabel pydantic=pydantic pydantic_core=pydantic-core
annotated_types=annotated-types typing_inspection=typing-inspection yaml=pyyaml safetensors=safetensors
rich=rich scipy=scipy"

missing() {
    "$PY" - "$NEEDED" <<'PYEOF'
import importlib.util, sys
pairs = [p.split("=") for p in sys.argv[1].split()]
print(" ".join(dist for module, dist in pairs if importlib.util.find_spec(module) is None))
PYEOF
}

absent="$(missing)"
if [[ -n "$absent" ]]; then
    wheels="${WHEELS:-.whl}"
    if [[ -d "$wheels" ]]; then
        target="$(mktemp -d /tmp/braing3n-gpu-check-XXXXXX)"
        echo "gpu_check: installing $absent from $wheels (no index) into $target" >&2
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-index --no-deps --no-compile --find-links "$wheels" --target "$target" $absent
        export PYTHONPATH="$PYTHONPATH:$target"
        absent="$(missing)"
    fi
fi
if [[ -n "$absent" ]]; then
    echo "gpu_check: missing Python packages: $absent" >&2
    echo "  install the project (pip install -e .), or put their wheels in ${WHEELS:-.whl}/ (pip download --no-deps)" >&2
    exit 2
fi

"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, '| CUDA', torch.cuda.is_available(), '|', torch.cuda.device_count(), 'GPU(s)')" >&2
exec "$PY" bench/gpu_check.py "$@"
