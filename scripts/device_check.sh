#!/usr/bin/env bash
# One-command check of the CUDA backend on a machine with an NVIDIA GPU and a CUDA build of torch installed.
#
#   scripts/device_check.sh            # results in build/device_check/ (PARARNN_DEVICE_CHECK_OUT overrides)
#
# Needs no network and no mlx: it uses the Python that has torch (PYTHON, default python3). Stages, each
# reported on its own with a time limit (a failed or timed-out stage does not stop the others):
#   1. build the extension in place with what is installed (nvcc from CUDA_HOME or PATH; only this GPU's
#      architecture, so the build is short), else reuse an existing build;
#   2. python -m pararnn_torch.selftest: every kernel and every mode at layer level against the references
#      (forward and all gradients, float32/bfloat16, T up to 65,536, GRU, LSTM and a user cell), one timing
#      table (sequential, parallel, kernel, fused, cuDNN GRU/LSTM; B=8, N=1024, T=512..16,384) and the
#      achieved bandwidth of each fused kernel against the device's peak;
#   3. compute-sanitizer memcheck, racecheck, initcheck and synccheck over tiny cases of every kernel.
# Everything goes to <out>/device_check.json (plus one log per stage). Exit status 0 only when every stage
# passed; without a GPU it says so in one line and exits 1. Aimed at under 8 minutes on an H100-class GPU.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${PARARNN_DEVICE_CHECK_OUT:-$ROOT/build/device_check}"
start=$SECONDS

# one torch import: the GPU's name (empty without one), then the torch build
probe="$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else ""); print("torch", torch.__version__, "CUDA build", torch.version.cuda)' 2>/dev/null)" \
  || probe=$'\n'"torch not importable by $PY"
gpu="$(head -n1 <<<"$probe")"
if [ -z "$gpu" ]; then
  echo "device_check: no CUDA GPU visible to torch here ($(tail -n1 <<<"$probe")); nothing to check"
  exit 1
fi
mkdir -p "$OUT"
capability="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
echo "device_check: $gpu (sm ${capability}), results in $OUT"
declare -A status seconds

# run_stage NAME LIMIT_S CMD...: runs CMD with a time limit, logs to $OUT/NAME.log, records pass/fail/timeout
run_stage() {
  local name="$1" limit="$2" t0=$SECONDS rc
  shift 2
  echo "device_check: [$name] $* (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  rc=$?
  seconds[$name]=$((SECONDS - t0))
  case $rc in
    0) status[$name]=passed ;;
    124|137) status[$name]="timed out after ${limit} s" ;;
    *) status[$name]="failed (exit $rc)" ;;
  esac
  echo "device_check: [$name] ${status[$name]} in ${seconds[$name]} s"
}

find_cuda_home() {
  local dir
  for dir in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")" \
      /usr/local/cuda /usr/local/cuda-*; do
    if [ -n "$dir" ] && [ -x "$dir/bin/nvcc" ] && [ -f "$dir/include/cuda_runtime_api.h" ]; then echo "$dir"; return 0; fi
  done
  return 1
}

# 1. build
if CUDA_HOME="$(find_cuda_home)"; then
  export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
  run_stage build 240 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$capability}" PARARNN_REQUIRE_EXTENSION=1 \
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace
else
  status[build]="skipped: no CUDA toolkit (nvcc) found, using the installed build"
  seconds[build]=0
  echo "device_check: [build] ${status[build]}"
fi
"$PY" -c 'from pararnn_torch import _ext; r = _ext.missing_reason("cuda"); print("device_check: CUDA kernels", "available" if r is None else "UNAVAILABLE: " + r)'

# 2. selftest (correctness of every mode, timing, bandwidth)
run_stage selftest 300 "$PY" -m pararnn_torch.selftest --json "$OUT/selftest.json"

# 3. compute-sanitizer over tiny cases of every kernel (only our kernels are instrumented)
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
for tool in memcheck racecheck initcheck synccheck; do
  if [ -x "$SANITIZER" ]; then
    run_stage "sanitizer_$tool" 75 "$SANITIZER" --tool "$tool" --error-exitcode 3 --kernel-name kns=pararnn \
      "$PY" -m pararnn_torch.selftest --sanitizer-cases
    if [ "${status[sanitizer_$tool]}" != passed ] && grep -q "ERROR SUMMARY: 0 errors" "$OUT/sanitizer_$tool.log" \
        && ! grep -q "sanitizer cases: done" "$OUT/sanitizer_$tool.log"; then
      status[sanitizer_$tool]="${status[sanitizer_$tool]} (the cases did not finish)"
    fi
  else
    status[sanitizer_$tool]="skipped: compute-sanitizer not found"
    seconds[sanitizer_$tool]=0
  fi
done

# summary: every stage, with the selftest's own results, as one JSON file
stages_json="{"
for name in "${!status[@]}"; do
  stages_json+="\"$name\": {\"status\": \"${status[$name]}\", \"seconds\": ${seconds[$name]}},"
done
stages_json="${stages_json%,}}"
"$PY" - "$OUT" "$stages_json" "$gpu" "$((SECONDS - start))" <<'PY'
import json, os, sys
out, stages, gpu, total = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
report = {"device": gpu, "seconds": total, "stages": stages}
path = os.path.join(out, "selftest.json")
if os.path.exists(path):
    with open(path) as f:
        report["selftest"] = json.load(f)
tmp = os.path.join(out, ".device_check.json.tmp")
with open(tmp, "w") as f:
    json.dump(report, f, indent=1)
os.replace(tmp, os.path.join(out, "device_check.json"))
print(f"device_check: wrote {os.path.join(out, 'device_check.json')}")
PY
failed=0
for name in build selftest sanitizer_memcheck sanitizer_racecheck sanitizer_initcheck sanitizer_synccheck; do
  printf 'device_check: %-20s %s\n' "$name" "${status[$name]:-not run}"
  case "${status[$name]:-}" in passed|skipped:*) ;; *) failed=1 ;; esac
done
echo "device_check: total $((SECONDS - start)) s"
exit $failed
