"""lampe's version is written twice, in lampe/_version.py (Python, and pyproject.toml through it)
and in csrc/include/lampe/lampe.h (LAMPE_VERSION_STRING, compiled into _C): they must agree."""
import os
import re

import pytest

import lampe
from lampe import _C

HEADER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "include", "lampe",
                      "lampe.h")


def test_the_compiled_extension_has_the_python_version():
    # _C.C_VERSION is lampe.h's LAMPE_VERSION_STRING as compiled: this also catches a stale build.
    assert _C.C_VERSION == lampe.__version__


def test_the_header_has_the_python_version():
    if not os.path.isfile(HEADER):
        pytest.skip("no source tree next to tests/ (the compiled check above still runs)")
    with open(HEADER) as f:
        found = re.findall(r'^#define LAMPE_VERSION_STRING "([^"]*)"$', f.read(), re.M)
    assert found == [lampe.__version__]
