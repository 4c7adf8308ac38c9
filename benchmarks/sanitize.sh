#!/usr/bin/env bash
# Address and undefined-behaviour sanitizers over the C++ CPU kernels (the row kernel, the few-classes
# kernel and the K-dimensional kernel, every instruction-set variant):
#
#     bash benchmarks/sanitize.sh                 # tests/test_ops.py and tests/test_kdim.py
#     bash benchmarks/sanitize.sh tests/test_half_accuracy.py -x
#
# The checkout's files (tracked and untracked, not ignored) are copied to SANITIZE_DIR (default
# build/sanitize, ignored by git), the extension is built there with -fsanitize=address,undefined
# (setup.py's TORCH_XENT_SANITIZE), and pytest runs there against that build with the sanitizer
# runtimes preloaded, so the development build in the checkout stays as it is. The variant tests start
# subprocesses, which inherit the preload. torch.compile tests are left out (inductor compiles its own
# C++, which is not this project's code, and takes minutes under the sanitizers), as are the tests
# marked slow (the 2^31-logit test needs 4 GB, several times that under ASan). UBSan stops at its first
# report; the last lines say how many reports of each sanitizer the log holds.
# PYTHON: the interpreter with torch installed (default .venv/bin/python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
DIR="${SANITIZE_DIR:-$ROOT/build/sanitize}"
PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
LOG="$DIR/sanitize.log"

mkdir -p "$DIR"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | grep -zv '^benchmarks/results/' \
  | tar --null -T - -cf -) | tar -xf - -C "$DIR"
cd "$DIR"
TORCH_XENT_SANITIZE=address,undefined TORCH_XENT_BUILD_CUDA=0 TORCH_XENT_REQUIRE_EXT=1 \
  "$PYTHON" setup.py build_ext --inplace > build.log 2>&1 || { tail -40 build.log; exit 1; }

if [ "$#" -eq 0 ]; then
  set -- tests/test_ops.py tests/test_kdim.py
fi
PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
status=0
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  PYTHONPATH="$DIR" "$PYTHON" -c "import torch_xent, sys; assert torch_xent.__file__.startswith('$DIR'), \
torch_xent.__file__; assert torch_xent._native.loaded(), 'the sanitized extension did not load'" || exit 1
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  PYTHONPATH="$DIR" "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" -k "not compile" "$@" \
  > "$LOG" 2>&1 || status=$?
tail -5 "$LOG"
echo "sanitize.sh: pytest exit status $status; AddressSanitizer reports: $(grep -c 'ERROR: AddressSanitizer' "$LOG" || true);" \
  "UBSan reports: $(grep -c 'runtime error:' "$LOG" || true); log: $LOG"
exit "$status"
