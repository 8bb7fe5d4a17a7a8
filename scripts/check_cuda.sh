#!/usr/bin/env bash
# Compile check of the CUDA part of the extension (no GPU needed).
#
# Creates (once) a separate virtual environment with the CUDA build of torch,
# builds pararnn_torch._C with nvcc for sm_80 and sm_90 (+ PTX) out of tree (build/cuda),
# and checks (scripts/check_cuda_ops.py) that the library registers CPU and CUDA
# kernels of pararnn::scan, fused_forward and fused_backward, holds code for every
# architecture and PTX for the newest, and that a user cell defined outside the
# package compiles for CUDA through the runtime NVRTC path (no GPU needed). Fails if anything does not compile; skips
# (exit 0, with the reason) only when nvcc is absent. Re-runs are cached: the
# venv is reused and the build is skipped when no source changed.
#
# Environment: PARARNN_CUDA_VENV (default .venv-cuda), PARARNN_CUDA_TORCH
# (default torch==2.14.1), TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), PYTHON.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$SECONDS

if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda: SKIPPED - nvcc not found on PATH, so the CUDA extension cannot be compiled here"
  exit 0
fi

# CUDA_HOME = the toolkit root holding include/cuda_runtime_api.h (`nvcc` on PATH may be a wrapper script)
find_cuda_home() {
  local nvcc_path candidates=()
  nvcc_path="$(command -v nvcc)"
  [ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME")
  candidates+=("$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")")
  # a wrapper script names the real nvcc in its exec line
  while read -r real; do candidates+=("$(dirname "$(dirname "$real")")"); done \
    < <(grep -aoE '/[^ "]+/bin/nvcc' "$nvcc_path" 2>/dev/null || true)
  candidates+=(/usr/local/cuda /usr/local/cuda-*)
  for dir in "${candidates[@]}"; do
    if [ -f "$dir/include/cuda_runtime_api.h" ] && [ -x "$dir/bin/nvcc" ]; then echo "$dir"; return 0; fi
  done
  return 1
}
if ! CUDA_HOME="$(find_cuda_home)"; then
  echo "check_cuda: FAILED - nvcc is on PATH but no toolkit root with include/cuda_runtime_api.h was found; set CUDA_HOME"
  exit 1
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
echo "check_cuda: CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1)), arch $TORCH_CUDA_ARCH_LIST"

VENV="${PARARNN_CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_SPEC="${PARARNN_CUDA_TORCH:-torch==2.14.1}"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
  echo "check_cuda: creating $VENV with $TORCH_SPEC (CUDA build)"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" numpy setuptools wheel ninja
fi
# what the runtime NVRTC path of a user cell needs (pararnn_core codegen, cuda-bindings)
if ! "$VENV/bin/python" -c "import sympy, cuda.bindings.nvrtc" >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q sympy cuda-bindings
fi
"$VENV/bin/python" -c "import torch; print('check_cuda: torch', torch.__version__, 'CUDA', torch.version.cuda)"

BUILD="$ROOT/build/cuda"
STAMP="$BUILD/stamp"
SOURCES=(setup.py csrc)
if [ -f "$STAMP" ] && [ -z "$(find "${SOURCES[@]}" -newer "$STAMP" 2>/dev/null)" ] \
    && [ "$(cat "$STAMP")" = "$TORCH_CUDA_ARCH_LIST $TORCH_SPEC" ]; then
  echo "check_cuda: sources unchanged since the last successful build, reusing it"
else
  rm -rf "$BUILD"
  PARARNN_REQUIRE_EXTENSION=1 MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py -q build_ext \
    --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp"
fi
LIB="$(ls "$BUILD"/lib/pararnn_torch/_C*.so)"

PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" scripts/check_cuda_ops.py "$LIB" "$TORCH_CUDA_ARCH_LIST"
# --- local memory (cuda-kernels): ptxas -v -warn-lmem-usage over the raw-pointer kernel units; fails when a
# float32 / bfloat16 / float16 kernel (any fused kernel, a scan with K <= 2) uses a stack frame or spills
LMEM_LOG="$BUILD/ptxas_lmem.log"
mkdir -p "$BUILD"
: > "$LMEM_LOG"
for unit in csrc/scan/scan_cuda.cu csrc/fused/fused_cuda.cu; do
  "$CUDA_HOME/bin/nvcc" -c -std=c++17 -O3 -gencode=arch=compute_80,code=sm_80 -Xptxas -v,-warn-lmem-usage \
    "$unit" -o "$BUILD/lmem_$(basename "$unit").o" >> "$LMEM_LOG" 2>&1
done
python3 - "$LMEM_LOG" <<'PY'
import re, subprocess, sys
text = open(sys.argv[1]).read()
entries = re.findall(
    r"Compiling entry function '([^']+)' for '(sm_\d+)'\n(?:ptxas info\s*: Function properties[^\n]*\n)?"
    r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores", text)
names = subprocess.run(["c++filt"], input="\n".join(e[0] for e in entries), capture_output=True, text=True).stdout.split("\n")
bad = []
for (mangled, arch, stack, spills), name in zip(entries, names):
    args = name[name.find("<") + 1 : name.find(">(")] if "<" in name else ""
    exempt = "double" in args or ("structured_scan_kernel" in name and int(args.split(",")[2]) > 2)
    if (int(stack) or int(spills)) and not exempt:
        bad.append(f"{name.split('(')[0]} [{arch}]: {stack} B stack, {spills} B spill stores")
print(f"check_cuda: ptxas lmem - {len(entries)} kernels checked, {len(bad)} f32/bf16/f16 kernels with local memory")
if bad:
    print("\n".join("  " + b for b in bad))
    sys.exit(1)
PY
echo "$TORCH_CUDA_ARCH_LIST $TORCH_SPEC" > "$STAMP"
echo "check_cuda: done in $((SECONDS - start)) s"
