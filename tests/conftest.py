import os
import sys

if os.environ.get("LAMPE_TEST_NO_TORCH") == "1":
    # The sanitizer run must not load torch (its own allocator and OpenMP confuse ASan): make
    # every `pytest.importorskip("torch")` skip.
    sys.modules["torch"] = None

import numpy as np
import pytest

import lampe


@pytest.fixture
def rng(request):
    # Fresh inputs per test, but reproducible from the test's name when a failure needs replaying.
    seed = int.from_bytes(request.node.nodeid.encode()[-8:].ljust(8, b"\0"), "little") ^ int(
        os.environ.get("LAMPE_TEST_SEED", "0"))
    return np.random.default_rng(seed)


ISAS = lampe.available_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test once per ISA path this host supports, restoring the best path afterwards."""
    lampe.set_cpu_isa(request.param)
    yield request.param
    lampe.set_cpu_isa(ISAS[-1])


def inv_freq(dim, base=10000.0):
    return (1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
