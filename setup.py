"""Build torch_ntk and its native core ``torch_ntk._C``.

The extension is built from every source under ``csrc/``: the C++ (CPU) kernel whenever a C++
compiler is found, the CUDA kernel too when torch is a CUDA build and nvcc is found (a GPU is
not needed to compile). Environment switches:

- ``TORCH_NTK_NO_NATIVE=1``: skip the extension; the pure-torch path is used everywhere.
- ``TORCH_NTK_FORCE_CUDA=1``: fail instead of building a CPU-only extension.
- ``TORCH_NTK_DEBUG=1``: ``-O0 -g`` instead of ``-O3``.
- ``CUDA_HOME`` (default ``/usr/local/cuda`` when it exists) and ``TORCH_CUDA_ARCH_LIST``
  (default ``"8.0;9.0"`` when no GPU is visible) as read by ``torch.utils.cpp_extension``.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    """The one version string, ``__version__`` in torch_ntk/__init__.py."""
    with open(os.path.join(ROOT, "torch_ntk", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _openmp_flags(cxx: str) -> list[str]:
    """``-fopenmp`` when the C++ compiler accepts it (GCC, clang with libomp), else nothing.

    Without it the CPU kernel still runs its tiles in parallel through ``at::parallel_for``
    (torch's own thread pool); OpenMP only lets ATen's pool and ours be the same one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        cmd = cxx.split() + ["-fopenmp", src, "-o", os.path.join(tmp, "omp")]
        try:
            ok = subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            ok = False
    return ["-fopenmp"] if ok else []


def _docs_requirements() -> list[str]:
    """The ``docs`` extra: docs/requirements.txt, which the README's docs command installs."""
    path = os.path.join(ROOT, "docs", "requirements.txt")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _native_extensions():
    """The ``torch_ntk._C`` extension and the build command, or ``([], {})`` when skipped."""
    if _flag("TORCH_NTK_NO_NATIVE"):
        return [], {}
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # read when cpp_extension is imported
    import torch
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        if _flag("TORCH_NTK_FORCE_CUDA"):
            sys.exit(f"TORCH_NTK_FORCE_CUDA=1 but no C++ compiler ({cxx}) was found.")
        print(f"torch_ntk: no C++ compiler ({cxx}); building without the native core.")
        return [], {}

    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    with_cuda = bool(torch.version.cuda) and nvcc is not None and os.path.exists(nvcc)
    if _flag("TORCH_NTK_FORCE_CUDA") and not with_cuda:
        sys.exit(f"TORCH_NTK_FORCE_CUDA=1 but CUDA can't be built: torch.version.cuda="
                 f"{torch.version.cuda!r}, nvcc={nvcc!r}. Set CUDA_HOME to the toolkit.")
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

    debug = _flag("TORCH_NTK_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    openmp = _openmp_flags(cxx)
    # -fno-math-errno lets sqrt vectorise (no kernel reads errno).
    args = {"cxx": opt + openmp + ["-fno-math-errno"]}
    macros = []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
        args["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        if debug:
            args["nvcc"] += ["-G"]
        macros.append(("WITH_CUDA", None))
        extension = cpp_extension.CUDAExtension
    else:
        extension = cpp_extension.CppExtension
    ext = extension("torch_ntk._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                    define_macros=macros, extra_compile_args=args, extra_link_args=openmp)
    build = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = _native_extensions()

setup(
    name="torch_ntk",
    version=_version(),
    description="Exact neural tangent kernels for PyTorch models",
    packages=find_packages(include=["torch_ntk", "torch_ntk.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    extras_require={
        "demo": ["matplotlib", "tqdm", "scikit-learn", "scipy"],
        "test": ["pytest", "scipy", "hypothesis", "matplotlib", "tqdm", "scikit-learn",
                 "torchdiffeq", "transformers", "timm"],
        "ode": ["torchdiffeq"],
        "docs": _docs_requirements(),
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
