"""Label text encoders: each label's text (:mod:`cxrlab.labels_text`) -> one vector, computed once and cached.

DWML (Jin, Lu, Zhu, Huo, "Deep learning based classification of multi-label chest X-ray images via
dual-weighted metric loss", Comput. Biol. Med. 157 (2023) 106683) encodes every label with BioBERT and
uses the vectors as class prototypes. Here the encoder is chosen by name (``model.text_encoder``):

``hashed``       [default, no dependency] character 3-5-grams of the label's name, synonyms and
                 description hashed into ``dim`` (512) signed buckets: words shared by two
                 descriptions (and their stems) make the vectors close.
``random``       fixed random vectors from the label name and ``seed``: the control, no text semantics.
``wordllama``    the ``wordllama`` package's static token embeddings (optional extra ``text``),
                 loaded from the package's own folder, never downloaded; ``dim`` 64..256.
``hf:<path|id>`` any Hugging Face encoder (BioBERT, BiomedBERT, ClinicalBERT...) through
                 ``transformers``, from a local folder or the local Hugging Face cache; ``pooling``
                 ``mean`` (of the last hidden state over real tokens, default) or ``cls``. Nothing is
                 downloaded unless ``model.text_encoder_args.download`` is true.

Options come from ``model.text_encoder_args``. The vectors are cached on disk per (encoder identity,
label texts) under ``<cache dir>/text-embeddings/``; the identity (name, version, options and, for
files, their SHA-256) goes with them into the checkpoint, and the head stores the matrix itself, so a
trained model never needs its text encoder again.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import CxrlabError, unknown
from ..labels_text import LabelText, label_texts
from ..registry import HEADS
from ..serialization import sha256_file
from .heads.base import Capability

ENCODERS = ("hashed", "random", "wordllama", "hf:<path-or-id>")


def _check_args(name: str, args: dict, accepted: tuple[str, ...]) -> None:
    for key in args:
        if key not in accepted:
            raise unknown(f"model.text_encoder_args key for text encoder {name!r}", key, accepted)


class TextEncoder:
    """``identity()`` says exactly what produces the vectors (it keys the cache);
    ``encode(texts) -> N×T float32`` produces them. ``labels`` are the label names (``random`` uses them)."""

    name = "?"

    def identity(self) -> dict:
        raise NotImplementedError

    def encode(self, texts: list[str], labels: list[str]) -> np.ndarray:
        raise NotImplementedError


class HashedEncoder(TextEncoder):
    """Signed feature hashing of character n-grams (fastText-style, with word-boundary marks) of
    the words of the text, stop words left out; term counts are log-damped so one repeated word
    does not dominate. Deterministic across machines (CRC-32, not Python's salted ``hash``)."""

    name = "hashed"
    STOP_WORDS = frozenset("a an and as at be by for from in into is it its of on or such than the to "
                           "with also called often most seen any other".split())

    def __init__(self, dim: int = 512, ngrams: tuple[int, int] | list[int] = (3, 5)):
        lo, hi = (int(n) for n in ngrams)
        if dim < 8 or not 1 <= lo <= hi:
            raise CxrlabError(f"text encoder hashed: need dim >= 8 and 1 <= ngrams[0] <= ngrams[1], got "
                              f"dim={dim}, ngrams={list(ngrams)}")
        self.dim, self.ngrams = int(dim), (lo, hi)

    def identity(self) -> dict:
        return {"name": self.name, "version": 1, "dim": self.dim, "ngrams": list(self.ngrams)}

    def _words(self, text: str) -> list[str]:
        cleaned = "".join(ch if ch.isalnum() else " " for ch in text.lower())
        return [w for w in cleaned.split() if w not in self.STOP_WORDS]

    def encode(self, texts: list[str], labels: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        lo, hi = self.ngrams
        for row, text in enumerate(texts):
            counts: dict[str, int] = {}
            for word in self._words(text):
                marked = f"<{word}>"
                for n in range(lo, hi + 1):
                    for start in range(max(1, len(marked) - n + 1)):
                        gram = marked[start:start + n]
                        counts[gram] = counts.get(gram, 0) + 1
            for gram, count in counts.items():
                h = zlib.crc32(gram.encode())
                sign = 1.0 if (h >> 31) & 1 else -1.0
                out[row, h % self.dim] += sign * np.log1p(count)
        return _unit(out)


class RandomEncoder(TextEncoder):
    """Fixed Gaussian vectors, one per label *name* (descriptions are ignored): the control."""

    name = "random"

    def __init__(self, dim: int = 512, seed: int = 0):
        if dim < 1:
            raise CxrlabError(f"text encoder random: dim must be >= 1, got {dim}")
        self.dim, self.seed = int(dim), int(seed)

    def identity(self) -> dict:
        return {"name": self.name, "version": 1, "dim": self.dim, "seed": self.seed}

    def encode(self, texts: list[str], labels: list[str]) -> np.ndarray:
        rows = [np.random.default_rng([self.seed, zlib.crc32(label.encode())]).standard_normal(self.dim)
                for label in labels]
        return _unit(np.stack(rows)) if rows else np.zeros((0, self.dim))


class WordLlamaEncoder(TextEncoder):
    """WordLlama (D. Lee Miller, 2024, https://github.com/dleemiller/WordLlama): average-pooled static
    token embeddings recycled from LLaMA-2-family models, ``l2_supercat`` 256-d, shipped in the wheel.
    ``dim`` < 256 uses its Matryoshka truncation (64 or 128)."""

    name = "wordllama"

    def __init__(self, dim: int = 256):
        try:
            import wordllama
        except ImportError:
            raise CxrlabError("text encoder wordllama needs the wordllama package: "
                              "pip install 'cxrlab[text]' (or pip install wordllama)") from None
        if dim not in (64, 128, 256):
            raise CxrlabError(f"text encoder wordllama: dim must be 64, 128 or 256, got {dim}")
        self.dim = int(dim)
        self.package = Path(wordllama.__file__).parent
        self.version = getattr(wordllama, "__version__", "unknown")
        self.weights = self.package / "weights" / "l2_supercat_256.safetensors"
        if not self.weights.is_file():
            raise CxrlabError(f"text encoder wordllama: its weights are not in the package folder "
                              f"({self.weights}); reinstall wordllama")

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version, "dim": self.dim, "config": "l2_supercat",
                "weights_sha256": sha256_file(self.weights)}

    def encode(self, texts: list[str], labels: list[str]) -> np.ndarray:
        import logging

        from wordllama import WordLlama

        level = logging.getLogger().level  # wordllama's import sets the root logger to INFO
        # the package folder is where load() looks first; as cache_dir it also rules out any download
        model = WordLlama.load(config="l2_supercat", dim=256, trunc_dim=None if self.dim == 256 else self.dim,
                               cache_dir=self.package, disable_download=True)
        logging.getLogger().setLevel(level)
        return _unit(np.asarray(model.embed(list(texts), norm=False), dtype=np.float64))


class HFEncoder(TextEncoder):
    """A Hugging Face encoder (``transformers.AutoModel`` + ``AutoTokenizer``) from a local folder or
    the local Hugging Face cache; the sentence vector is the mean of the last hidden state over the
    real tokens (``pooling: mean``) or the first token's (``cls``)."""

    def __init__(self, location: str, pooling: str = "mean", max_length: int = 128, download: bool = False):
        if not location:
            raise CxrlabError("text encoder hf: needs a model, e.g. hf:/models/biobert or "
                              "hf:dmis-lab/biobert-base-cased-v1.1")
        if pooling not in ("mean", "cls"):
            raise unknown("text encoder pooling", pooling, ("mean", "cls"))
        self.location, self.pooling, self.max_length = location, pooling, int(max_length)
        self.name = f"hf:{location}"
        self.folder = self._resolve(location, bool(download))

    def _resolve(self, location: str, download: bool) -> Path:
        path = Path(location).expanduser()
        looks_like_path = path.is_absolute() or location.startswith(".") or path.exists()
        if looks_like_path:
            if not path.is_dir():
                raise CxrlabError(f"text encoder hf:{location}: {path} is not a folder (expected a Hugging "
                                  "Face model folder with config.json, weights and tokenizer files)")
            if not (path / "config.json").is_file():
                raise CxrlabError(f"text encoder hf:{location}: {path} is not a model folder (no config.json)")
            return path
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CxrlabError("text encoder hf: needs transformers: pip install 'cxrlab[text]'") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or not download
        try:
            return Path(snapshot_download(location, local_files_only=offline))
        except Exception as exc:  # not in the cache (offline), unknown repository, no network
            raise CxrlabError(
                f"text encoder hf:{location}: model not found on disk ({type(exc).__name__}). Put the model "
                f"folder (config.json, weights, tokenizer files) somewhere and name it hf:/that/folder, "
                f"or place it in the Hugging Face cache ({_hf_cache()}) with `huggingface-cli download "
                f"{location}` on a machine that is online, or allow a download with "
                f"model.text_encoder_args.download=true") from None

    def identity(self) -> dict:
        import transformers

        files = {p.name: sha256_file(p) for p in sorted(self.folder.iterdir())
                 if p.is_file() and not p.name.startswith(".")}
        return {"name": self.name, "transformers": transformers.__version__, "pooling": self.pooling,
                "max_length": self.max_length, "files_sha256": files}

    def encode(self, texts: list[str], labels: list[str]) -> np.ndarray:
        import torch

        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise CxrlabError("text encoder hf: needs transformers: pip install 'cxrlab[text]'") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            model = AutoModel.from_pretrained(str(self.folder), local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise CxrlabError(f"text encoder {self.name}: cannot load a model and tokenizer from "
                              f"{self.folder}: {exc}") from None
        with torch.no_grad():
            batch = tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")
            hidden = model(**batch).last_hidden_state.double()
            if self.pooling == "cls":
                vectors = hidden[:, 0]
            else:
                weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                vectors = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return _unit(vectors.numpy())


_SIMPLE = {"hashed": (HashedEncoder, ("dim", "ngrams")), "random": (RandomEncoder, ("dim", "seed")),
           "wordllama": (WordLlamaEncoder, ("dim",))}


def get_encoder(spec: str, args: dict | None = None) -> TextEncoder:
    """The encoder named by ``model.text_encoder`` with ``model.text_encoder_args``."""
    args = dict(args or {})
    if not isinstance(spec, str):
        raise CxrlabError(f"model.text_encoder must be a string, got {spec!r}")
    if spec.startswith("hf:"):
        _check_args(spec, args, ("pooling", "max_length", "download"))
        return HFEncoder(spec[3:], **args)
    if spec not in _SIMPLE:
        raise unknown("text encoder (model.text_encoder)", spec, [*_SIMPLE, "hf:<path-or-id>"])
    cls, accepted = _SIMPLE[spec]
    _check_args(spec, args, accepted)
    return cls(**args)


def encode_labels(texts: list[LabelText], spec: str = "hashed", args: dict | None = None,
                  cache_dir: Path | None = None) -> tuple[np.ndarray, dict]:
    """``(vectors L×T float32, unit rows; identity)`` for the labels' texts, from the on-disk cache when
    the same encoder (same identity) has already encoded the same texts."""
    encoder = get_encoder(spec, args)
    identity = encoder.identity()
    strings = [t.text() for t in texts]
    labels = [t.name for t in texts]
    key = hashlib.sha256(json.dumps({"encoder": identity, "labels": labels, "texts": strings},
                                    sort_keys=True).encode()).hexdigest()
    identity = {**identity, "texts_sha256": key}
    path = None
    if cache_dir is not None:
        slug = "".join(ch if ch.isalnum() else "-" for ch in encoder.name)[:40]
        path = Path(cache_dir) / "text-embeddings" / f"{slug}-{key[:16]}.npy"
        if path.is_file():
            vectors = np.load(path, allow_pickle=False)
            if vectors.shape[0] == len(texts):
                return vectors.astype(np.float32), identity
    vectors = np.asarray(encoder.encode(strings, labels), dtype=np.float32)
    if vectors.shape[0] != len(texts) or not np.all(np.isfinite(vectors)):
        raise CxrlabError(f"text encoder {encoder.name} returned {vectors.shape} (expected {len(texts)} finite rows)")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npy")
        np.save(tmp, vectors)
        os.replace(tmp, path)
    return vectors, identity


def label_embeddings(label_names, model_config, cache_dir: Path | None = None) -> tuple[np.ndarray, dict]:
    """Vectors and identity for a recipe's labels: its ``model.text_encoder``, ``text_encoder_args`` and
    ``label_descriptions`` overrides (what the pipeline hands to the ``prototype`` head)."""
    texts = label_texts(list(label_names), getattr(model_config, "label_descriptions", None))
    return encode_labels(texts, getattr(model_config, "text_encoder", "hashed"),
                         getattr(model_config, "text_encoder_args", None), cache_dir)


def cache_root(data_cache_dir: str | None) -> Path:
    """Where cxrlab caches live: ``data.cache_dir``, else ``$CXRLAB_CACHE``, else ``~/.cache/cxrlab``."""
    if data_cache_dir:
        return Path(data_cache_dir)
    return Path(os.environ.get("CXRLAB_CACHE", Path.home() / ".cache" / "cxrlab"))


def check_label_text(recipe) -> None:
    """Fail early (before data is prepared) on an unknown encoder, bad arguments, a missing hf: model or
    a label description override that names no label; nothing is encoded. A no-op for other heads."""
    if Capability.LABEL_TEXT not in HEADS.get(recipe.model.head).capabilities:
        return
    get_encoder(recipe.model.text_encoder, recipe.model.text_encoder_args)


def attach_label_text(model, recipe, label_names) -> None:
    """Give a label-text head (``prototype``) its vectors from the recipe's encoder, through the cache
    (what the pipeline calls after building the model; a no-op for other heads)."""
    head = model.head
    if Capability.LABEL_TEXT not in head.capabilities:
        return
    vectors, identity = label_embeddings(label_names, recipe.model, cache_root(recipe.data.cache_dir))
    head.set_label_text(vectors, identity)


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    v = _unit(np.asarray(vectors, dtype=np.float64))
    return np.clip(v @ v.T, -1.0, 1.0)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _hf_cache() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
        return str(HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"
