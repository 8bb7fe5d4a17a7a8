#!/usr/bin/env bash
# The CPU emulator under ThreadSanitizer (all threads of a block concurrent: a missing barrier is a race) and
# under AddressSanitizer + UndefinedBehaviorSanitizer (out-of-bounds and UB in kernels and launchers), over a
# representative subset: the shipped scan launcher (K = 2, float32, every direction, several tiles and a
# partial channel block) and the shared-memory poison check. The two runs go in parallel (one core each).
# Called by scripts/test.sh; the emulated libraries are rebuilt with -fsanitize (cached per flags).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
SUBSET=(tests/test_emulation.py -q -p no:cacheprovider -k "cuda_scan_launcher_matches_framework_scan and 2-f32 or poisoned")
start=$SECONDS
LD_PRELOAD="$(g++ -print-file-name=libtsan.so)" TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0" \
  PARARNN_EMU_SANITIZE=thread PARARNN_EMU_SCHEDULE=concurrent "$PY" -m pytest "${SUBSET[@]}" &
tsan=$!
LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)" \
  ASAN_OPTIONS="detect_leaks=0" UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1" \
  PARARNN_EMU_SANITIZE=address,undefined "$PY" -m pytest "${SUBSET[@]}" &
asan=$!
status=0
wait "$tsan" || { echo "emulation_sanitizers: FAILED under ThreadSanitizer"; status=1; }
wait "$asan" || { echo "emulation_sanitizers: FAILED under ASan + UBSan"; status=1; }
echo "emulation_sanitizers: ThreadSanitizer and ASan + UBSan done in $((SECONDS - start)) s"
exit "$status"
