"""Builds seqkernels._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and
nvcc is found. A GPU is not needed to build the CUDA part (CI compiles it on CPU machines).

Environment:
  SEQKERNELS_CUDA=auto|0|1     build the CUDA sources (auto: when torch has CUDA and nvcc exists)
  SEQKERNELS_CUDA_ARCHS        "8.0;9.0" by default; -gencode per arch plus PTX for the newest
  MAX_JOBS                     parallel compile jobs for ninja
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    # torch guesses the toolkit root from nvcc's location, which is wrong when nvcc on PATH is a
    # wrapper script (the link then fails with "cannot find -lcudart"); prefer the explicit
    # variable, then the standard install root, and only then torch's guess.
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home and os.path.exists("/usr/local/cuda/bin/nvcc"):
        home = "/usr/local/cuda"
    if home:
        os.environ["CUDA_HOME"] = home
    return home


def _want_cuda(torch):
    mode = os.environ.get("SEQKERNELS_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "off", "no"):
        return False
    home = _cuda_home()
    nvcc = (home and os.path.exists(os.path.join(home, "bin", "nvcc"))) or shutil.which("nvcc")
    has = torch.version.cuda is not None and bool(nvcc)
    if mode in ("1", "true", "on", "yes") and not has:
        raise RuntimeError(
            "SEQKERNELS_CUDA=1 but the CUDA part cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc found={bool(nvcc)}. "
            "Install a CUDA build of torch and the CUDA toolkit, or set SEQKERNELS_CUDA=0."
        )
    return has


def cuda_archs():
    return [
        a.strip() for a in os.environ.get("SEQKERNELS_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";") if a.strip()
    ]


def gencode_flags(archs):
    flags = []
    for a in archs:
        num = a.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    newest = max(archs, key=lambda a: float(a)).replace(".", "")
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _extensions():
    # torch.utils.cpp_extension fixes CUDA_HOME when it is imported, so resolve it before that import.
    _cuda_home()
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    with_cuda = _want_cuda(torch)
    sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp" if os.name != "nt" else "/openmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    archs = cuda_archs() if with_cuda else []
    define = [("SEQKERNELS_CUDA_ARCHS", '"' + ";".join(archs) + '"')]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        # torch's CUDA headers include cusparse.h, which a minimal toolkit install may lack;
        # the CUDA build of torch ships them in its nvidia-* wheels, which match torch's CUDA version.
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
        for root in (spec.submodule_search_locations or []) if spec else []:
            if os.path.exists(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include", "cusparse.h")):
                break
            include_dirs += sorted(
                d
                for d in glob.glob(os.path.join(root, "*", "include"))
                if os.path.exists(os.path.join(d, "cusparse.h"))
            )
        nvcc = [
            "-O3",
            "-std=c++20",
            "--use_fast_math",
            "-lineinfo",
            "--expt-relaxed-constexpr",
            "-Xptxas=-warn-spills",
        ] + gencode_flags(archs)
        home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        lib_dirs = [d for d in (os.path.join(home, "lib64"), os.path.join(home, "lib")) if os.path.isdir(d)]
        ext = CUDAExtension(
            "seqkernels._C",
            sources,
            include_dirs=include_dirs,
            library_dirs=lib_dirs,
            extra_compile_args={"cxx": cxx + ["-DSEQKERNELS_WITH_CUDA"], "nvcc": nvcc + ["-DSEQKERNELS_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
            define_macros=define,
        )
    else:
        ext = CppExtension(
            "seqkernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            define_macros=define,
        )
    return [ext]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    # triton_kernels/ sits at the top of the repository (the kernels are not Python-package code in
    # spirit: they are the Triton backend, next to csrc/) and installs as seqkernels.triton_kernels.
    packages=find_packages("python") + ["seqkernels.triton_kernels"],
    package_dir={"": "python", "seqkernels.triton_kernels": "triton_kernels"},
    package_data={"seqkernels": ["py.typed"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
)
