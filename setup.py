"""Builds seqkernels._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and
nvcc is found. A GPU is not needed to build the CUDA part (CI compiles it on CPU machines).

Environment:
  SEQKERNELS_CUDA=auto|0|1     build the CUDA sources (auto: when torch has CUDA and nvcc exists)
  SEQKERNELS_CUDA_ARCHS        "8.0;9.0" by default; -gencode per arch plus PTX for the newest
  MAX_JOBS                     parallel compile jobs for ninja
  SEQKERNELS_BUILD_DIR         where the object files live between builds (default <repo>/build/temp.<config>)

The extension uses only the stable Python ABI (csrc/registration.cpp's PyInit__C needs no pybind11
and nothing from libtorch_python), so it is built with py_limited_api and the wheel is tagged
cp310-abi3: one wheel per torch version (and CUDA variant) serves every Python >= 3.10.
"""

import glob
import os
import re
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The minimum CPython the stable-ABI build targets: the wheel tag, and the Py_LIMITED_API value torch's
# BuildExtension defines for py_limited_api extensions (torch.utils.cpp_extension.min_supported_cpython).
LIMITED_API_TAG = "cp310"


def _version():
    # The one place the version is written is python/seqkernels/__init__.py; read, not imported
    # (importing seqkernels needs the extension this script is about to build).
    with open(os.path.join(ROOT, "python", "seqkernels", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


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
    # -g0: Python's default flags (sysconfig CFLAGS) carry -g; the debug information made
    # csrc/cpu/attention.cpp take 1.5x as long to compile (87 s against 59 s on the 2-core CI
    # machine) and its object 19x as large, for line numbers nobody ships. Symbols stay.
    cxx = ["-O3", "-std=c++20"] + (["-g0", "-fopenmp"] if os.name != "nt" else ["/openmp"])
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
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "seqkernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            define_macros=define,
            py_limited_api=True,
        )
    return [ext]


def persistent_build_dir(torch, with_cuda):
    """Where ninja keeps the object files between builds. pip builds (`pip install -e`, `pip wheel`)
    point build_temp at a fresh temporary folder every time, which recompiles everything; a stable
    folder lets ninja recompile only the sources (and headers, through its depfiles) that changed.
    Keyed by torch version and CUDA on/off so switching between them does not thrash one folder."""
    override = os.environ.get("SEQKERNELS_BUILD_DIR")
    if override:
        return os.path.abspath(override)
    tag = "torch" + torch.__version__.split("+")[0] + ("-cuda" if with_cuda else "-cpu")
    return os.path.join(ROOT, "build", "temp." + tag)


def _cmdclass():
    import torch
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            with_cuda = any(s.endswith(".cu") for e in self.distribution.ext_modules or () for s in e.sources)
            self.build_temp = persistent_build_dir(torch, with_cuda)
            # setuptools skips an extension whose output is newer than its sources, blind to the
            # headers (csrc/**/*.h, *.cuh); ninja's depfiles see them, so always let ninja decide
            # (a no-op build costs the link, seconds).
            self.force = True

        def run(self):
            # A pre-abi3 build left in build/lib would be packed into the wheel next to the new one.
            _remove_stale_full_abi_builds(os.path.join(self.build_lib, "seqkernels"))
            super().run()
            if self.inplace or getattr(self, "editable_mode", False):
                _remove_stale_full_abi_builds(os.path.join(ROOT, "python", "seqkernels"))

    return {"build_ext": Build.with_options(use_ninja=True)}


def _remove_stale_full_abi_builds(pkg):
    # Before the abi3 build the extension was _C.cpython-3XX-<platform>.so. Python's import prefers
    # that suffix over .abi3.so, so a stale copy next to a fresh build would shadow it.
    for stale in glob.glob(os.path.join(pkg, "_C.cpython-*")):
        os.remove(stale)


def _install_requires():
    # The compiled extension only loads with the torch release it was built against (torch's C++
    # ABI is not stable across releases), so the wheel and the editable install pin it; the local
    # tag (+cpu, +cu130) is not part of the pin, the variant is the builder's choice (README).
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "numpy"]


setup(
    version=_version(),
    install_requires=_install_requires(),
    # triton_kernels/ sits at the top of the repository (the kernels are not Python-package code in
    # spirit: they are the Triton backend, next to csrc/) and installs as seqkernels.triton_kernels.
    packages=find_packages("python") + ["seqkernels.triton_kernels"],
    package_dir={"": "python", "seqkernels.triton_kernels": "triton_kernels"},
    package_data={"seqkernels": ["py.typed"]},
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    # Tags the wheel cp310-abi3 (the extension above is compiled with -DPy_LIMITED_API=0x030A0000).
    options={"bdist_wheel": {"py_limited_api": LIMITED_API_TAG}},
)
