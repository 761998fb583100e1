"""Build of lampe's C extension.

Only the per-ISA kernel units get ISA flags (setuptools would otherwise apply extra_compile_args
to every source, letting AVX-512 code leak into shared helpers and SIGILL on older CPUs), so a
build_ext subclass adds flags by file name. No -march=native, no -ffast-math: the kernels rely
on IEEE infinities for masking.
"""
import os
import platform
import sys
import sysconfig

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # PEP 517 backends do not put the project on sys.path
from build_cuda import cuda_build_ext  # noqa: E402  the optional lampe._cuda (LAMPE_CUDA=1/0/auto)
X86 = platform.machine().lower() in ("x86_64", "amd64", "x86-64")

ISA_FLAGS = {
    "kernels_avx2.c": ["-mavx2", "-mfma", "-mf16c"],
    "kernels_avx512.c": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
    "kernels_avx512bf16.c": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
                             "-mavx512dq", "-mavx512bf16"],
}

BASE_FLAGS = ["-std=c11", "-O3", "-fno-strict-aliasing", "-fvisibility=hidden", "-Wall", "-Wextra",
              "-Wno-unused-parameter", "-Wno-missing-field-initializers", "-Wno-cast-function-type"]
if os.environ.get("LAMPE_WERROR") == "1":
    BASE_FLAGS.append("-Werror")
SANITIZE = os.environ.get("LAMPE_SANITIZE")  # e.g. "address,undefined" for the CI ASan run
if SANITIZE:
    BASE_FLAGS += [f"-fsanitize={SANITIZE}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g",
                   "-fno-wrapv"]


def sources():
    core = [f"csrc/core/{n}" for n in ("positions.c", "dispatch.c", "threadpool.c", "rope.c", "attention.c")]
    cpu = ["csrc/cpu/kernels_scalar.c"]
    if X86:
        cpu += [f"csrc/cpu/{n}" for n in ISA_FLAGS]
    return core + cpu + ["csrc/python/module.c"]


class BuildExt(build_ext):
    def build_extensions(self):
        compiler = self.compiler
        original = compiler._compile

        def _compile(obj, src, ext, cc_args, extra_postargs, pp_opts):
            extra = list(extra_postargs) + ISA_FLAGS.get(os.path.basename(src), [])
            return original(obj, src, ext, cc_args, extra, pp_opts)

        compiler._compile = _compile
        cc = sysconfig.get_config_var("CC") or "cc"
        for ext in self.extensions:
            ext.define_macros += [("LAMPE_COMPILER", f'"{_escape(cc)}"'),
                                  ("LAMPE_CFLAGS", f'"{_escape(" ".join(BASE_FLAGS))}"')]
        super().build_extensions()


def _escape(s):
    return s.replace("\\", "\\\\").replace('"', '\\"')


ext = Extension(
    "lampe._C",
    sources=sources(),
    include_dirs=["csrc/include", np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    extra_compile_args=BASE_FLAGS,
    extra_link_args=["-pthread"] + ([f"-fsanitize={SANITIZE}"] if SANITIZE else []),
    libraries=["m"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": cuda_build_ext(BuildExt)})
