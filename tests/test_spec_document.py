"""docs/spec.md is the one place the worked examples live: tests/spec_examples.py must be what
tools/extract_spec_examples.py transcribes from it, and the repository cites only files it has."""
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "docs", "spec.md")

if not os.path.isfile(SPEC):
    pytest.skip("no source tree next to tests/ (docs/spec.md)", allow_module_level=True)


def _extractor():
    spec = importlib.util.spec_from_file_location("extract_spec_examples",
                                                  os.path.join(ROOT, "tools", "extract_spec_examples.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spec_examples_are_transcribed_from_docs_spec():
    with open(SPEC, encoding="utf-8") as f:
        expected = _extractor().transcribe(f.read())
    with open(os.path.join(ROOT, "tests", "spec_examples.py"), encoding="utf-8") as f:
        assert f.read() == expected, "run: python tools/extract_spec_examples.py docs/spec.md"


def test_spec_has_the_cited_sections():
    with open(SPEC, encoding="utf-8") as f:
        text = f.read()
    headings = re.findall(r"^##+ (\d+(?:\.\d+)?)\.? ", text, re.M)
    assert {"0", "1", "1.1", "1.2", "1.3", "1.4", "2", "2.1", "2.2", "2.3", "2.4", "3", "4", "5", "6"} <= set(headings)
    cited = set()
    for folder in ("lampe", "csrc", "tests", "tools", "docs", "bench"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".py", ".c", ".h", ".md")):
                    with open(os.path.join(base, name), encoding="utf-8", errors="replace") as f:
                        cited |= set(re.findall(r"§(\d+(?:\.\d+)?)", f.read()))
    assert cited <= set(headings), f"sections cited but missing from docs/spec.md: {sorted(cited - set(headings))}"


def _repository_files():
    out = []
    for folder in ("lampe", "csrc", "tests", "tools", "docs", "bench", "notebooks", ".ci"):
        for base, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if not d.startswith(("__pycache__", "build"))]
            out += [os.path.relpath(os.path.join(base, name), ROOT) for name in files]
    return out + [name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name))]


def test_the_repository_cites_only_files_it_has():
    """Docs and comments point at files inside the repository: every Markdown file named, and
    every source path under one of the repository's folders, must exist (a coordination note kept
    beside the repository once leaked into four places as if it were part of it)."""
    files = _repository_files()
    names = {os.path.basename(f) for f in files}
    md = re.compile(r"(?<![\w/.-])([\w-]+\.md)\b")
    path = re.compile(r"(?<![\w/.-])((?:lampe|csrc|tests|tools|docs|bench|notebooks)/[\w./-]*\.(?:py|c|h|cu|cuh|cpp|md|sh))\b")
    missing = set()
    for f in files:
        if not f.endswith((".md", ".py", ".c", ".h", ".cu", ".cuh", ".cpp", ".sh", ".toml")) or f.startswith("tests/data"):
            continue
        with open(os.path.join(ROOT, f), encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        missing |= {(f, m) for m in md.findall(text) if m not in names}
        for p in path.findall(text):  # from the root, the citing file's folder, or csrc/include
            bases = (ROOT, os.path.join(ROOT, os.path.dirname(f)), os.path.join(ROOT, "csrc", "include"))
            if not any(os.path.exists(os.path.join(b, p)) for b in bases):
                missing.add((f, p))
    assert not missing, sorted(missing)
