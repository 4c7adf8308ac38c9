"""Build policy for torch_xent (and nothing else).

- The C++ CPU kernels are built whenever a C++ compiler is present.
- The CUDA kernels are added when a CUDA toolkit (nvcc) and a CUDA build of torch agree on the
  major version (TORCH_XENT_BUILD_CUDA=0 turns them off, =1 insists).
- TORCH_XENT_BUILD_EXT=0 installs pure Python; so does a failed compile, unless
  TORCH_XENT_REQUIRE_EXT=1, which makes a failed compile fail the install.
Every decision is printed, prefixed with "torch_xent setup:".
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def say(msg):
    print(f"torch_xent setup: {msg}", file=sys.stderr, flush=True)


def env_flag(name, default=None):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


def nvcc_major(cuda_home):
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None, None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


def extension_modules():
    if env_flag("TORCH_XENT_BUILD_EXT", True) is False:
        say("TORCH_XENT_BUILD_EXT=0: installing pure Python (the reference implementation)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        say(f"torch is not importable ({exc}): installing pure Python; install torch first and build with "
            "--no-build-isolation to get the compiled kernels")
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        say("no C++ compiler found: installing pure Python")
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources = [os.path.relpath(os.path.join(ROOT, s), ROOT) for s in sources]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-fvisibility=hidden"]
    define_macros = []
    extra_link = []
    sanitize = os.environ.get("TORCH_XENT_SANITIZE")
    if sanitize:  # e.g. address,undefined: see the README's development section
        cxx_flags = ["-O1", "-g", f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]
        extra_link.append(f"-fsanitize={sanitize}")
        say(f"building with -fsanitize={sanitize}")
    # ATen's parallel_for is an inline `#pragma omp parallel` in torch's OpenMP builds (every Linux
    # wheel): without -fopenmp, which cpp_extension does not add, it runs every row on one thread.
    # Linked like torch itself against libgomp.so.1, so the process keeps one OpenMP runtime.
    if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        extra_link.append("-fopenmp")

    want_cuda = env_flag("TORCH_XENT_BUILD_CUDA", None)
    use_cuda = False
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if want_cuda is False:
        say("TORCH_XENT_BUILD_CUDA=0: CUDA kernels not built")
    elif torch.version.cuda is None:
        say(f"torch {torch.__version__} is a CPU build: CUDA kernels not built")
    elif not cuda_sources:
        say("no CUDA sources: CUDA kernels not built")
    else:
        major, minor = nvcc_major(cpp_extension.CUDA_HOME)
        torch_major = int(torch.version.cuda.split(".")[0])
        if major is None:
            say(f"torch is built for CUDA {torch.version.cuda} but no nvcc was found (set CUDA_HOME): "
                "CUDA kernels not built")
        elif major != torch_major:
            say(f"nvcc is CUDA {major}.{minor} but torch is built for CUDA {torch.version.cuda}: "
                "CUDA kernels not built")
        else:
            use_cuda = True
    if want_cuda and not use_cuda:
        raise SystemExit("torch_xent setup: TORCH_XENT_BUILD_CUDA=1 but the CUDA kernels cannot be built (see above)")

    if use_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        say(f"building C++ and CUDA kernels (nvcc {major}.{minor}, torch CUDA {torch.version.cuda}, "
            f"arch list {os.environ['TORCH_CUDA_ARCH_LIST']})")
        define_macros.append(("TORCH_XENT_WITH_CUDA", str(major * 100 + minor)))
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension(
            "torch_xent._C", sources + cuda_sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=extra_link)
    else:
        say("building the C++ CPU kernels")
        ext = cpp_extension.CppExtension(
            "torch_xent._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=extra_link)

    class BuildExt(cpp_extension.BuildExtension):
        """Falls back to pure Python when the compile fails, unless TORCH_XENT_REQUIRE_EXT=1."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
                say(f"built {extension.name}")
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if env_flag("TORCH_XENT_REQUIRE_EXT", False):
                    raise
                say(f"building {extension.name} FAILED ({type(exc).__name__}: {exc}); installing pure Python. "
                    "Set TORCH_XENT_REQUIRE_EXT=1 to make this an error.")

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()

setup(
    name="torch_xent",
    version="0.1.0",
    description="Fused softmax cross-entropy for PyTorch: a drop-in for F.cross_entropy, on CPU and GPU",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    packages=find_packages(include=["torch_xent", "torch_xent.*"]),
    package_data={"torch_xent": ["data/*.csv", "data/*.json"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"train": ["tensorboard", "tqdm"], "test": ["pytest", "hypothesis", "tensorboard", "expecttest"],
                    "transformers": ["transformers>=5.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
