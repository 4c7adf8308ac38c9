#!/usr/bin/env bash
# Proves that the CUDA kernels (csrc/cuda) compile and link, and that the built extension registers
# them, on a machine with nvcc but without a GPU. It builds in its own virtual environment, with a
# CUDA build of torch matching nvcc's major version, so the CPU-only development venv stays as it is.
#
#   bash .ci/cuda_build_check.sh          # skips (exit 0) when no nvcc is found
#
# Settings (environment): CUDA_VENV (default .venv-cuda, reused when present),
# CUDA_TORCH (default torch==2.14.1, a CUDA 13 build), TORCH_CUDA_ARCH_LIST (default 8.0;9.0),
# MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

# nvcc: CUDA_HOME first, then PATH, then the standard install location.
nvcc=""
if [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
  nvcc="${CUDA_HOME}/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
  nvcc="$(command -v nvcc)"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
  nvcc=/usr/local/cuda/bin/nvcc
fi
if [[ -z "$nvcc" ]]; then
  echo "cuda_build_check: SKIPPED: no nvcc (set CUDA_HOME or put nvcc on PATH) - CUDA kernels not checked"
  exit 0
fi
if [[ -z "${CUDA_HOME:-}" || ! -f "${CUDA_HOME}/include/cuda_runtime.h" ]]; then
  # nvcc may be a wrapper outside the toolkit: ask it where its own binaries live.
  here="$("$nvcc" -v --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -1)"
  CUDA_HOME="$(cd "${here:-$(dirname "$(readlink -f "$nvcc")")}/.." && pwd)"
fi
export CUDA_HOME
if [[ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]]; then
  echo "cuda_build_check: FAILED: found nvcc ($nvcc) but no CUDA headers under $CUDA_HOME (set CUDA_HOME)"
  exit 1
fi
nvcc_version="$("$nvcc" --version | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p')"
echo "cuda_build_check: nvcc $nvcc_version at $nvcc (CUDA_HOME=$CUDA_HOME)"

venv="${CUDA_VENV:-.venv-cuda}"
torch_spec="${CUDA_TORCH:-torch==2.14.1}"
py="$venv/bin/python"
if [[ ! -f "$venv/.deps" ]]; then
  python3 -m venv "$venv"
  echo "cuda_build_check: creating $venv with $torch_spec (a large download the first time)"
  {
    "$py" -m pip install -q --upgrade "pip>=23.1" &&
    "$py" -m pip install -q "$torch_spec" &&
    "$py" -m pip install -q numpy==2.4.6 setuptools==84.2.1 wheel==0.48.0 ninja==1.13.2
  } > "$venv/pip.log" 2>&1 || { cat "$venv/pip.log"; echo "cuda_build_check: FAILED: pip install"; exit 1; }
  touch "$venv/.deps"
fi
torch_cuda="$("$py" -c 'import torch; print(torch.version.cuda or "")')"
if [[ -z "$torch_cuda" ]]; then
  echo "cuda_build_check: FAILED: $venv holds a CPU build of torch; remove $venv or set CUDA_TORCH to a CUDA build"
  exit 1
fi
if [[ "${torch_cuda%%.*}" != "${nvcc_version%%.*}" ]]; then
  echo "cuda_build_check: SKIPPED: nvcc is CUDA $nvcc_version but $torch_spec is built for CUDA $torch_cuda" \
       "(set CUDA_TORCH to a torch built for CUDA ${nvcc_version%%.*})"
  exit 0
fi
echo "cuda_build_check: torch $("$py" -c 'import torch; print(torch.__version__)') (CUDA $torch_cuda)"

# Build out of tree, in a copy of the sources inside the venv, so that the development venv's in-place
# build (torch_xent/_C*.so) is neither used nor replaced. The copy keeps the files' times and the
# build folder stays, so ninja recompiles only what changed since the last run.
src="$venv/src"
rm -rf "$src"
mkdir -p "$src"
cp -a setup.py README.md csrc torch_xent "$src/"
rm -f "$src"/torch_xent/_C*.so
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_XENT_REQUIRE_EXT=1 TORCH_XENT_BUILD_CUDA=1 PATH="$(cd "$(dirname "$py")" && pwd):$PATH"
log="$venv/build.log"
if ! (cd "$src" && ../bin/python setup.py build_ext --inplace --build-temp ../build) >"$log" 2>&1; then
  cat "$log"
  if grep -q "C++20 or later compatible compiler is required" "$log"; then
    echo "cuda_build_check: this torch needs C++20: setup.py must not force an older -std (let torch choose)"
  fi
  echo "cuda_build_check: FAILED: the build failed (log above)"
  exit 1
fi
grep "torch_xent setup:" "$log" || true
# Warnings in our own sources only (torch's headers and the compiler's intrinsics are noisy).
grep -E "csrc/[^ ]*(\([0-9]+\)|:[0-9]+:[0-9]+:) warning" "$log" | sed "s|^.*/csrc/|csrc/|" | sort -u || true

# The import needs no GPU: loading the library registers the kernels with the dispatcher.
(cd "$src" && ../bin/python - <<'PY'
import sys
import torch
import torch_xent
from torch_xent import _native
if not _native.loaded():
    sys.exit(f"cuda_build_check: FAILED: the extension did not load: {_native.load_error()}")
missing = [op for op in ("cross_entropy_forward", "cross_entropy_forward_inplace")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"torch_xent::{op}", "CUDA")]
if missing:
    sys.exit(f"cuda_build_check: FAILED: no CUDA kernel registered for {missing}")
version = torch.ops.torch_xent.cuda_version()
if version <= 0:
    sys.exit(f"cuda_build_check: FAILED: cuda_version() is {version}")
print(f"cuda_build_check: OK: CUDA kernels registered (built with CUDA {version // 100}.{version % 100}, "
      f"torch {torch.__version__})")
PY
)
# Nothing above touches the development venv or its in-tree build: say so if it cannot import.
if [[ -x .venv/bin/python ]] && ! .venv/bin/python -c "import torch_xent" >/dev/null 2>&1; then
  echo "cuda_build_check: warning: .venv cannot import torch_xent (not caused by this check; run make setup)"
fi
echo "cuda_build_check: done in $(( $(date +%s) - start )) s"
