"""The optional CUDA extension lampe._cuda (csrc/cuda), imported by setup.py.

LAMPE_CUDA=1 builds it (and fails loudly if it cannot), LAMPE_CUDA=0 never does, and unset means
"auto": build when torch with CUDA and nvcc are both present in the build environment. Without
it the package, its C extension and every CPU test are exactly what they are without this file.

Architectures: TORCH_CUDA_ARCH_LIST when set (e.g. "9.0"), else 8.0 and 9.0 (sm_90a for 9.0, so
the same cubin runs on H100/H200). MAX_JOBS limits nvcc's parallel jobs as usual.

GPU users build against the torch they already have (docs/cuda.md):
    LAMPE_CUDA=1 pip install --no-build-isolation --no-deps .
"""
from __future__ import annotations

import os
import shutil

DEFAULT_ARCHS = "8.0;9.0"
SOURCES = ["csrc/cuda/plan.cu", "csrc/cuda/rope.cu", "csrc/cuda/attn_prefill.cu", "csrc/cuda/attn_decode.cu",
           "csrc/cuda/attention.cu", "csrc/cuda/binding.cpp"]


def _wanted() -> str:
    flag = os.environ.get("LAMPE_CUDA", "auto").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return "yes"
    if flag in ("0", "false", "no", "off"):
        return "no"
    return "auto"


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def arch_flags(arch_list: str) -> tuple[list[str], str]:
    """nvcc -gencode flags and the "sm_80 sm_90a" label for an arch list like "8.0;9.0+PTX"."""
    flags, names = [], []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        # "9.0a" (torch's spelling of the arch-specific feature set, set on some GPU images) = sm_90a
        num = item.replace("+PTX", "").replace(".", "").removesuffix("a")
        if not num.isdigit():
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {item!r}")
        if int(num) < 80:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: {item} is below 8.0; the kernels use sm_80 instructions")
        sm = f"{num}a" if num == "90" else num  # sm_90a: the Hopper feature set (wgmma later)
        flags.append(f"-gencode=arch=compute_{sm},code=sm_{sm}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
        names.append(f"sm_{sm}")
    if not flags:
        raise ValueError("TORCH_CUDA_ARCH_LIST is empty")
    return flags, " ".join(names)


def _cuda_extension():
    """(the lampe._cuda Extension, torch's BuildExtension class), or (None, None) when the CUDA
    module is not to be built."""
    wanted = _wanted()
    if wanted == "no":
        return None, None
    nvcc = _nvcc()
    if nvcc and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        # torch guesses CUDA_HOME from nvcc's directory when unset; an nvcc in /usr/local/bin
        # would make that /usr/local, which has no lib64/libcudart: take a real toolkit root
        for root in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
            if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) and \
                    os.path.isdir(os.path.join(root, "lib64")):
                os.environ["CUDA_HOME"] = root
                break
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        if wanted == "yes":
            raise RuntimeError("LAMPE_CUDA=1 needs torch in the build environment: install lampe with "
                               "`pip install --no-build-isolation` into an environment that has a CUDA torch")
        return None, None
    if torch.version.cuda is None or nvcc is None:
        if wanted == "yes":
            raise RuntimeError(f"LAMPE_CUDA=1 needs a CUDA build of torch (found {torch.__version__}) and nvcc "
                               f"(found {nvcc})")
        return None, None
    # cpp_extension adds no -gencode of its own once ours are in the nvcc flags
    flags, label = arch_flags(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)
    macros = [("LAMPE_TORCH_VERSION", f'"{torch.__version__}"'), ("LAMPE_CUDA_ARCHS", f'"{label}"')]
    ext = CUDAExtension(
        "lampe._cuda",
        sources=SOURCES,
        include_dirs=["csrc/cuda", "csrc/include"],
        define_macros=macros,
        extra_compile_args={
            "cxx": ["-O3"],  # torch chooses the C++ standard its headers need (C++20 since 2.13)
            # no --use_fast_math: the kernels need accurate sincosf and IEEE infinities
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"] + flags,
        },
    )
    return ext, BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


def cuda_build_ext(base):
    """setup.py's build_ext class, extended to also build lampe._cuda when wanted.

    The C extension keeps setup.py's own build_ext (its per-ISA flags); lampe._cuda is built
    after it by torch's BuildExtension as a sub-command sharing build_lib / build_temp / inplace,
    so torch's compiler settings never touch the C sources."""
    ext, torch_build = _cuda_extension()
    if ext is None:
        return base

    class BuildExtWithCuda(base):
        def run(self):
            super().run()
            cmd = torch_build(self.distribution)
            cmd.inplace = self.inplace
            saved = self.distribution.ext_modules
            self.distribution.ext_modules = [ext]  # finalize_options prepares these extensions
            try:
                cmd.ensure_finalized()
            finally:
                self.distribution.ext_modules = saved
            cmd.build_lib = self.build_lib
            cmd.build_temp = os.path.join(self.build_temp, "cuda")
            cmd.inplace = self.inplace
            cmd.run()

        def get_outputs(self):
            return list(super().get_outputs()) + [self.get_ext_fullpath(ext.name)]

    return BuildExtWithCuda
