#!/usr/bin/env bash
# The GPU checks of issue 12 in one short script (a few minutes on one GPU, nothing downloaded):
#   1. a Python whose torch sees CUDA (this checkout's .venv, $PYTHON or python3; the harness runs from the
#      checkout, PYTHONPATH, nothing installed), carried wheels installed beside it; says clearly when the
#      torch build has no CUDA (exit 3) or a harness dependency is missing (exit 4);
#   2. the `gpu` tests (tests/test_gpu.py) and the CPU-side device tests, against that torch;
#   3. two short runs with --device cuda on a tiny Mixtral (the plain cache, then fiddler), result and telemetry
#      copied under $OUT;
#   4. the NVML columns of the run's timeline and the overlap of host-to-device copies with expert compute.
# Usage: scripts/gpu_check.sh   (OUT=folder for the files to keep; PYTHON=a python with a CUDA torch)
# GPU_CHECK_DEVICE=cpu runs the same steps on the CPU (the gpu tests skip): a check of this script itself.
# Wheels for dependencies the machine lacks: put them in .whl/ (scripts/gpu_wheels.sh, run where pip works).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
WORK=${TMPDIR:-/tmp}/harness-gpu-check
SITE=$WORK/site
mkdir -p "$OUT" "$WORK"
export PYTHONPATH=$PWD:$SITE PYTHONUNBUFFERED=1 HARNESS_CACHE=$WORK/cache
exec > >(tee "$OUT/gpu_check.log") 2>&1

probe='import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())'
echo "== 1. torch and CUDA"
base=""
for cand in ${PYTHON:-} .venv/bin/python python3; do
    command -v "$cand" >/dev/null 2>&1 || continue
    seen=$("$cand" -c "$probe" 2>/dev/null) || { echo "$cand: no torch"; continue; }
    read -r version cuda available <<<"$seen"
    echo "$cand: torch $version, torch.version.cuda=$cuda, torch.cuda.is_available()=$available"
    if [ "$available" = True ] || [ "$DEVICE" = cpu ]; then base=$cand; break; fi
done
if [ -z "$base" ]; then
    echo "CUDA UNAVAILABLE: no Python here has a torch that sees a GPU (a torch.version.cuda of None is a CPU-only"
    echo "wheel, such as the local torch==2.13.0 CPU build; give PYTHON=a python with a CUDA torch)"
    exit 3
fi
PY=$base
if compgen -G ".whl/*.whl" >/dev/null; then
    # Beside the interpreter's own packages (a venv over a venv would lose them, as the GPU image's python3 is one).
    "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 4
fi
[ "$DEVICE" = cpu ] || "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| CUDA', torch.version.cuda)"
missing=$("$PY" - <<'EOF'
import importlib
names = ["pydantic", "pyudev", "xxhash", "numba", "pynvml", "transformers", "accelerate", "safetensors", "pyarrow",
         "psutil", "click", "rich", "yaml", "jinja2", "pandas", "matplotlib", "pytest"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "MISSING PACKAGES: $missing (carry their wheels in .whl/: scripts/gpu_wheels.sh)"
    exit 4
fi

echo "== 2. gpu tests"
# Only the files with gpu tests: a module that cannot be collected here (an optional package) does not stop them.
mapfile -t gpu_files < <(grep -l "mark.gpu" tests/test_*.py)
"$PY" -m pytest -q -p no:cacheprovider -m gpu "${gpu_files[@]}"
tests=$?
"$PY" -m pytest -q -p no:cacheprovider tests/test_device_path.py || tests=1

echo "== 3. short runs on the GPU"
model=$WORK/mixtral-tiny
{ "$PY" -m harness model create --arch mixtral --preset tiny --out "$model" --force &&
    "$PY" -m harness model pack "$model"; } || { echo "cannot create the tiny model"; exit 1; }
echo '{"telemetry_hz": 50}' >"$WORK/spec.json"  # samples often enough for a run of a few seconds
common=(--spec "$WORK/spec.json" --model "$model" --device "$DEVICE" --cache-experts 50% --decode greedy
        --max-new-tokens 32 --warmup-steps 2 --min-steady-s 0 --prompt "the quick brown fox jumps over the lazy dog"
        --quiet --force)
"$PY" -m harness run "${common[@]}" --results "$WORK/results" --json | tee "$WORK/cache_run.json"
"$PY" -m harness run "${common[@]}" --strategy fiddler --results "$WORK/results-fiddler" --json
run_dir=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["result"])' "$WORK/cache_run.json" | xargs dirname)
if [ ! -f "$run_dir/result.json" ]; then
    echo "GPU CHECK: the --device $DEVICE run wrote no result (see above)"
    exit 1
fi
for f in result.json timeline.parquet events.parquet device_spans.parquet; do
    cp "$run_dir/$f" "$OUT/" 2>/dev/null || echo "run folder lacks $f"
done

echo "== 4. NVML columns and copy/compute overlap"
"$PY" - "$run_dir" "$WORK/results-fiddler" <<'EOF'
import json, sys
from pathlib import Path
import pyarrow.parquet as pq
from harness.runtime.device import overlap_summary

run = Path(sys.argv[1])
result = json.loads((run / "result.json").read_text())
timeline, events = pq.read_table(run / "timeline.parquet"), pq.read_table(run / "events.parquet")
print("telemetry gpu:", result["telemetry"]["gpu"], "| missing:", result["telemetry"]["missing"])
t = timeline.column("t_s").to_pylist()
print(f"timeline: {timeline.num_rows} samples, t_s {t[0]:.3f}..{t[-1]:.3f}")
for name in timeline.column_names:
    if name.startswith("gpu_"):
        v = [x for x in timeline.column(name).to_pylist() if x == x]
        print(f"  {name}: min {min(v):.4g} mean {sum(v) / len(v):.4g} max {max(v):.4g}" if v else f"  {name}: no values")
tokens = [ts for ts, n in zip(events.column("t_s").to_pylist(), events.column("name").to_pylist()) if n == "token"]
print(f"token events: {len(tokens)}, t_s {min(tokens):.3f}..{max(tokens):.3f} (same clock as the samples)")
if (run / "device_spans.parquet").is_file():
    spans = pq.read_table(run / "device_spans.parquet").to_pylist()
    summary = overlap_summary([(r["kind"], r["t_start_s"], r["t_end_s"]) for r in spans])
    print("device copy/compute (from device_spans.parquet):", json.dumps(summary))
else:
    print("no device_spans.parquet: the run computed on", result["resolved"]["device"])
print("metrics.device_copy_compute:", json.dumps(result["metrics"]["device_copy_compute"]))
m = result["metrics"]
print(f"cache run: decode {m.get('decode_tokens_per_s')} tok/s, hit rate {m.get('hit_rate_decode')}, "
      f"validity {result['validity']}")
for fid in Path(sys.argv[2]).glob("*/result.json"):
    r = json.loads(fid.read_text())
    s = r.get("strategy") or {}
    print(f"fiddler run: status {r['status']} {r.get('error') or ''}, decode "
          f"{(r.get('metrics') or {}).get('decode_tokens_per_s')} tok/s, cost model "
          f"{json.dumps((s.get('stats') or {}).get('cost_model'))}")
EOF
[ "$tests" -eq 0 ] && echo "GPU CHECK: tests passed" || echo "GPU CHECK: tests FAILED (exit $tests)"
exit "$tests"
