"""Build of ``maskdm_kernels._C``: CUDA + C++ when torch has CUDA and nvcc is found, C++ alone otherwise.

Environment:
  MASKDM_SKIP_BUILD=1   build nothing (the package still works through its Triton and torch backends)
  MASKDM_FORCE_CUDA=1   compile the CUDA sources with no visible GPU (CI proves they compile and link)
  TORCH_CUDA_ARCH_LIST  archs to compile for; default: the visible GPU's, else "8.0;9.0+PTX"
  MAX_JOBS              parallel compile jobs (read by torch.utils.cpp_extension)
"""

import glob
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
INFO_FILE = ROOT / "maskdm_kernels" / "_build_info.py"


def say(msg: str) -> None:
    print(f"[maskdm build] {msg}", file=sys.stderr, flush=True)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=False).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def write_build_info(**facts) -> None:
    lines = ['"""Written by setup.py at build time; do not edit."""', "", "BUILD_INFO = {"]
    lines += [f"    {k!r}: {v!r}," for k, v in facts.items()]
    lines += ["}", ""]
    INFO_FILE.write_text("\n".join(lines))


def find_cuda_home(torch_cuda_home):
    """torch guesses CUDA_HOME from nvcc's directory; a symlinked /usr/local/bin/nvcc makes that /usr/local.

    Accept the guess only if it holds the runtime library; else follow nvcc's real path."""
    def has_runtime(home):
        return home and any(glob.glob(os.path.join(home, d, "libcudart*")) for d in ("lib64", "lib", "targets/*/lib"))

    if has_runtime(os.environ.get("CUDA_HOME")):
        return os.environ["CUDA_HOME"]
    if has_runtime(torch_cuda_home):
        return torch_cuda_home
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = str(Path(nvcc).resolve().parent.parent)
        if has_runtime(home):
            return home
    for home in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if has_runtime(home) and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def pip_nvidia_dirs():
    """Include and lib dirs of pip-installed ``nvidia-*`` CUDA wheels (torch's headers need e.g. cusparse.h)."""
    incs, libs = [], []
    for sp in {p for p in sys.path if p.endswith("site-packages")}:
        base = os.path.join(sp, "nvidia")
        incs += sorted(d for d in glob.glob(os.path.join(base, "*", "include")) + glob.glob(
            os.path.join(base, "*", "*", "include")) if os.path.isdir(d))
        libs += sorted(d for d in glob.glob(os.path.join(base, "*", "lib")) + glob.glob(
            os.path.join(base, "*", "*", "lib")) if os.path.isdir(d))
    return incs, libs


def default_arch_list(torch) -> str:
    if torch.cuda.is_available():
        archs = sorted({"{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())})
        return ";".join(archs)
    return "8.0;9.0+PTX"  # no GPU to ask: Ampere and Hopper cubins, and PTX later GPUs compile at load


def build_ext_class(cpp_extension):
    """BuildExtension whose objects keep a ``.cu`` source's suffix: csrc/<op>.cpp and csrc/<op>.cu (STYLE.md's
    pairing) would otherwise both compile to <op>.o."""

    class BuildExt(cpp_extension.BuildExtension):
        def build_extensions(self):
            object_filenames = self.compiler.object_filenames

            def distinct_object_filenames(sources, *args, **kwargs):
                objects = object_filenames(sources, *args, **kwargs)
                return [os.path.splitext(o)[0] + ".cu" + os.path.splitext(o)[1] if s.endswith(".cu") else o
                        for s, o in zip(sources, objects)]

            self.compiler.object_filenames = distinct_object_filenames
            super().build_extensions()

    return BuildExt


def extensions():
    if os.environ.get("MASKDM_SKIP_BUILD", "0") == "1":
        say("skipping the C++/CUDA extension: MASKDM_SKIP_BUILD=1")
        write_build_info(built=False, reason="MASKDM_SKIP_BUILD=1", commit=git_commit())
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:  # pragma: no cover - build without torch
        say(f"skipping the C++/CUDA extension: torch is not importable ({e}); use --no-build-isolation")
        write_build_info(built=False, reason=f"torch not importable: {e}", commit=git_commit())
        return [], {}

    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    link_flags = ["-fopenmp"]
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    cu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))

    force = os.environ.get("MASKDM_FORCE_CUDA", "0") == "1"
    with_cuda, why_not = False, None
    cuda_home = None
    if torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is a CPU build"
    else:
        cuda_home = find_cuda_home(cpp_extension.CUDA_HOME)
        if cuda_home is None:
            why_not = "nvcc / the CUDA toolkit was not found (set CUDA_HOME)"
        elif not (torch.cuda.is_available() or force):
            why_not = "no visible GPU (set MASKDM_FORCE_CUDA=1 to compile the CUDA kernels anyway)"
        else:
            with_cuda = True
    if not with_cuda:
        say(f"skipping the CUDA kernels: {why_not}; building the C++ (CPU) kernels only")

    facts = {"built": True, "torch": torch.__version__, "torch_cuda": torch.version.cuda, "with_cuda": with_cuda,
                 "cuda_skip_reason": why_not, "commit": git_commit(), "platform": platform.platform(),
                 "python": platform.python_version()}
    incs, libs = pip_nvidia_dirs()
    if with_cuda:
        # cpp_extension reads CUDA_HOME at import time; point it at the real toolkit before building.
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or default_arch_list(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout.strip()
        facts.update(cuda_home=cuda_home, nvcc=nvcc_version.splitlines()[-1] if nvcc_version else "?",
                     cuda_archs=archs)
        say(f"building CUDA + C++ kernels for archs {archs} with {nvcc}")
        ext = cpp_extension.CUDAExtension(
            "maskdm_kernels._C",
            sources + cu_sources,
            include_dirs=[str(ROOT / "csrc")] + incs,
            library_dirs=libs,
            define_macros=[("MASKDM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                                         "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "maskdm_kernels._C",
            sources,
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    cxx = os.environ.get("CXX", "c++")
    cxx_version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()
    facts["compiler"] = cxx_version[0] if cxx_version else cxx
    write_build_info(**facts)
    use_ninja = shutil.which("ninja") is not None
    return [ext], {"build_ext": build_ext_class(cpp_extension).with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
