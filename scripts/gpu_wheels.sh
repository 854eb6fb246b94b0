#!/usr/bin/env bash
# Wheels of the harness's dependencies that a GPU machine's image may lack (its Python is 3.12; it has torch,
# transformers, accelerate, numba, pyarrow, nvidia-ml-py ...), fetched into .whl/ where pip can reach an index,
# for scripts/gpu_check.sh to install there with --no-index. Versions: those of this checkout's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PY_VERSION=${GPU_PYTHON_VERSION:-3.12}
mapfile -t pins < <("$PY" - <<'PYEOF'
import importlib.metadata as m
for name in ["pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "pyudev"]:
    print(f"{name}=={m.version(name)}")
PYEOF
)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    "${platforms[@]}" -d .whl "${pins[@]}"
ls -l .whl
