"""Build of lampe's C extension.

The flags live in lampe/_buildflags.py (shared with tests/c/run.sh). Only the per-ISA kernel
units get ISA flags: they are compiled as separate objects through the compiler's public
``compile`` API, each with its own flags, and linked into the extension; every other source is an
ordinary extension source built with the base flags. (setuptools would otherwise apply
extra_compile_args to every source, letting AVX-512 code leak into shared helpers and SIGILL on
older CPUs.)
"""
import glob
import importlib.util
import os
import platform
import sys
import sysconfig
import tempfile

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

try:
    from setuptools.modified import newer_group
except ImportError:  # setuptools < 69
    from distutils.dep_util import newer_group

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # PEP 517 backends do not put the project on sys.path
from build_cuda import cuda_build_ext  # noqa: E402  the optional lampe._cuda (LAMPE_CUDA=1/0/auto)
X86 = platform.machine().lower() in ("x86_64", "amd64", "x86-64")


def _load_flags():
    # By path: importing the lampe package would import the extension this script builds.
    spec = importlib.util.spec_from_file_location("_lampe_buildflags", os.path.join(ROOT, "lampe", "_buildflags.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FLAGS = _load_flags()
BASE_FLAGS = list(FLAGS.BASE)
if os.environ.get("LAMPE_WERROR") == "1":
    BASE_FLAGS.append("-Werror")
SANITIZE = os.environ.get("LAMPE_SANITIZE")  # e.g. "address,undefined" for the CI ASan run
if SANITIZE:
    BASE_FLAGS += FLAGS.sanitizer_flags(SANITIZE)

CORE = [f"csrc/core/{n}" for n in ("positions.c", "dispatch.c", "threadpool.c", "rope.c", "attention.c")]
ISA_SOURCES = [f"csrc/cpu/{n}" for n in FLAGS.ISA_UNITS] if X86 else []


class BuildExt(build_ext):
    """Compiles the ISA units first, each with BASE + its ISA flags, then the extension with
    those objects added to its link. A unit whose flags this compiler rejects is left out, and
    dispatch.c is told (its level then reports unavailable)."""

    def _accepts(self, flags):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "flags.c")
            with open(src, "w") as fh:
                fh.write("int lampe_flag_probe(void) { return 0; }\n")
            try:
                self.compiler.compile([src], output_dir=tmp, extra_postargs=BASE_FLAGS + flags)
            except CompileError:
                return False
        return True

    def build_extension(self, ext):
        if not (self.force or newer_group(ext.sources + ext.depends, self.get_ext_fullpath(ext.name), "newer")):
            return super().build_extension(ext)  # up to date: it says so and skips
        units = []
        for src in ISA_SOURCES:
            unit = os.path.basename(src)
            if self._accepts(FLAGS.isa_flags(unit)):
                units.append(src)
            elif unit in FLAGS.UNIT_MISSING_MACRO:
                print(f"lampe: {self.compiler.compiler_so[0]} rejects {' '.join(FLAGS.isa_flags(unit))}: "
                      f"building without {unit}")
                ext.define_macros.append((FLAGS.UNIT_MISSING_MACRO[unit], "1"))
            else:
                raise CompileError(f"the compiler rejects the flags of {unit}: {' '.join(FLAGS.isa_flags(unit))}")
        objects = []
        for src in units:
            objects += self.compiler.compile(
                [src], output_dir=self.build_temp, macros=ext.define_macros, include_dirs=ext.include_dirs,
                debug=self.debug, extra_postargs=BASE_FLAGS + FLAGS.isa_flags(os.path.basename(src)),
                depends=ext.depends)
        ext.extra_objects = [o for o in ext.extra_objects if o not in objects] + objects
        super().build_extension(ext)

    def build_extensions(self):
        cc = sysconfig.get_config_var("CC") or "cc"
        for ext in self.extensions:
            ext.define_macros += [("LAMPE_COMPILER", f'"{_escape(cc)}"'),
                                  ("LAMPE_CFLAGS", f'"{_escape(" ".join(BASE_FLAGS))}"')]
        super().build_extensions()


def _escape(s):
    return s.replace("\\", "\\\\").replace('"', '\\"')


ext = Extension(
    "lampe._C",
    sources=CORE + ["csrc/cpu/kernels_scalar.c", "csrc/python/module.c"],
    # Headers and ISA units: a change to any of them rebuilds the extension.
    depends=sorted(glob.glob("csrc/**/*.h", recursive=True)) + ISA_SOURCES,
    include_dirs=["csrc/include", np.get_include()],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")],
    extra_compile_args=BASE_FLAGS,
    extra_link_args=["-pthread"] + ([f"-fsanitize={SANITIZE}"] if SANITIZE else []),
    libraries=["m"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": cuda_build_ext(BuildExt)})
