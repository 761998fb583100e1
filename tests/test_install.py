"""What a user sees when Python imports a source tree whose C extension is not built.

`python -m lampe ...`, a REPL or a notebook started in a checkout's root put that directory first
on sys.path, so its lampe/ (nothing compiled there) shadows an installed lampe. The user must get
one line saying what to run, not a "partially initialized module (circular import)" traceback.
"""
import importlib.machinery
import os
import shutil
import subprocess
import sys

import pytest

import lampe

PACKAGE = os.path.dirname(os.path.abspath(lampe.__file__))


@pytest.fixture
def unbuilt_tree(tmp_path):
    """A copy of the lampe package without its compiled extension, as a fresh clone has it."""
    shutil.copytree(PACKAGE, tmp_path / "lampe", ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    return tmp_path


def run(args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_python_m_lampe_in_an_unbuilt_tree_says_what_to_run(unbuilt_tree):
    r = run(["-m", "lampe", "demo"], unbuilt_tree)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "circular import" not in r.stderr and "partially initialized" not in r.stderr
    assert "not built" in lines[0] and "pip install -e ." in lines[0] and str(unbuilt_tree) in lines[0]


def test_import_in_an_unbuilt_tree_says_what_to_run(unbuilt_tree):
    r = run(["-c", "import lampe"], unbuilt_tree)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: lampe's C extension is not built"), r.stderr
    assert "pip install -e ." in last
    assert "circular import" not in r.stderr and "During handling" not in r.stderr


def test_a_broken_extension_is_named(unbuilt_tree):
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (unbuilt_tree / "lampe" / f"_C{suffix}").write_bytes(b"not a shared object")
    r = run(["-c", "import lampe"], unbuilt_tree)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "does not load" in last and "pip install -e ." in last, r.stderr
