"""FAISS index of unit state embeddings with stable int64 ids (see docs/cache.md).

Inner product on L2-normalised vectors is cosine similarity. The index is exact (flat) while it is
small and switches to HNSW above ``hnsw_threshold`` entries. HNSW has no native removal, so removed
ids are tombstoned, filtered from results, and the graph is rebuilt when tombstones exceed
``rebuild_tombstone_fraction`` of the live entries.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True, kw_only=True)
class IndexConfig:
    """Configuration of :class:`PriorIndex`.

    Attributes:
        dim: Embedding dimension.
        hnsw_threshold: Live entries above which the index is HNSW instead of exact.
        hnsw_m: HNSW graph degree.
        hnsw_ef_construction: HNSW build beam width.
        hnsw_ef_search: HNSW search beam width (recall vs latency).
        rebuild_tombstone_fraction: Rebuild HNSW when tombstones exceed this fraction of live ids.
        use_gpu: Put the exact index on a GPU when faiss-gpu and a GPU are present.
    """

    dim: int
    hnsw_threshold: int = 20_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    rebuild_tombstone_fraction: float = 0.25
    use_gpu: bool = False

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"IndexConfig.dim must be >= 1, got {self.dim}")
        if self.hnsw_threshold < 0 or self.hnsw_m < 2 or self.hnsw_ef_search < 1:
            raise ValueError("IndexConfig HNSW sizes out of range")
        if not 0 < self.rebuild_tombstone_fraction <= 1:
            raise ValueError("IndexConfig.rebuild_tombstone_fraction must be in (0, 1]")


def _gpu_count(faiss) -> int:
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


class PriorIndex:
    """Nearest-neighbour search over unit embeddings keyed by int64 ids.

    Args:
        config: Index configuration.
    """

    def __init__(self, config: IndexConfig) -> None:
        import faiss

        self._faiss = faiss
        self.config = config
        self._vectors: dict[int, np.ndarray] = {}
        self._tombstones: set[int] = set()
        # Assigned a faiss index by ``_new_index`` below; faiss ships no type stubs.
        self._index: Any = None
        self.kind = "flat"
        self.rebuilds = 0
        self._new_index("flat")

    # -- construction -------------------------------------------------------------------------
    def _new_index(self, kind: str) -> None:
        faiss = self._faiss
        d = self.config.dim
        if kind == "flat":
            base = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
            if self.config.use_gpu and _gpu_count(faiss) > 0:
                res = faiss.StandardGpuResources()
                base = faiss.index_cpu_to_gpu(res, 0, base)
            self._index = base
        else:
            hnsw = faiss.IndexHNSWFlat(d, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            hnsw.hnsw.efConstruction = self.config.hnsw_ef_construction
            hnsw.hnsw.efSearch = self.config.hnsw_ef_search
            self._index = faiss.IndexIDMap(hnsw)
        self.kind = kind
        self._tombstones.clear()

    def _rebuild(self, kind: str) -> None:
        self._new_index(kind)
        if self._vectors:
            ids = np.fromiter(self._vectors.keys(), dtype=np.int64, count=len(self._vectors))
            vecs = np.stack([self._vectors[int(i)] for i in ids])
            self._index.add_with_ids(vecs, ids)
        self.rebuilds += 1

    # -- mutation -----------------------------------------------------------------------------
    def _check(self, vectors: np.ndarray) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.config.dim:
            raise ValueError(
                f"embedding dimension mismatch: index has dim {self.config.dim}, got shape "
                f"{tuple(np.shape(vectors))}"
            )
        if not np.isfinite(v).all():
            raise ValueError("embedding holds NaN or inf values")
        return np.ascontiguousarray(v)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under ids (ids must not be present)."""
        v = self._check(vectors)
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) != len(v):
            raise ValueError(f"{len(ids)} ids for {len(v)} vectors")
        for i, row in zip(ids.tolist(), v, strict=True):
            if i in self._vectors:
                raise ValueError(f"id {i} is already in the index")
            self._vectors[i] = row.copy()
        if self.kind == "flat" and len(self._vectors) > self.config.hnsw_threshold:
            self._rebuild("hnsw")
            return
        self._index.add_with_ids(v, ids)

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids (unknown ids are ignored)."""
        known = [
            int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1) if int(i) in self._vectors
        ]
        if not known:
            return
        for i in known:
            del self._vectors[i]
        if self.kind == "flat":
            self._index.remove_ids(np.asarray(known, dtype=np.int64))
            return
        self._tombstones.update(known)
        if len(self._vectors) <= self.config.hnsw_threshold // 2:
            self._rebuild("flat")
        elif len(self._tombstones) > self.config.rebuild_tombstone_fraction * len(self._vectors):
            self._rebuild("hnsw")

    def clear(self) -> None:
        """Drop everything."""
        self._vectors.clear()
        self._new_index("flat")

    # -- queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._vectors)

    def __contains__(self, entry_id: int) -> bool:
        return int(entry_id) in self._vectors

    def vector(self, entry_id: int) -> np.ndarray:
        """The stored vector of an id."""
        return self._vectors[int(entry_id)]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """k nearest live ids by inner product.

        Args:
            queries: ``(B, dim)`` or ``(dim,)`` unit vectors.
            k: Neighbours per query.

        Returns:
            ``(similarities (B, k) float32, ids (B, k) int64)``; missing slots have id -1 and
            similarity -inf.
        """
        q = self._check(queries)
        b = q.shape[0]
        sims = np.full((b, k), -np.inf, dtype=np.float32)
        out_ids = np.full((b, k), -1, dtype=np.int64)
        if not self._vectors:
            return sims, out_ids
        fetch = min(len(self._vectors) + len(self._tombstones), k + len(self._tombstones))
        fetch = max(fetch, k)
        s, ids = self._index.search(q, fetch)
        if not self._tombstones:
            kk = min(k, s.shape[1])
            sims[:, :kk] = s[:, :kk]
            out_ids[:, :kk] = ids[:, :kk]
            out_ids[out_ids < 0] = -1
            sims[out_ids < 0] = -np.inf
            return sims, out_ids
        for r in range(b):
            j = 0
            for sim, i in zip(s[r], ids[r], strict=True):
                if i < 0 or int(i) in self._tombstones:
                    continue
                sims[r, j], out_ids[r, j] = sim, i
                j += 1
                if j == k:
                    break
        return sims, out_ids

    # -- persistence (no pickle) --------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``vectors.npy``, ``ids.npy`` and ``index.json`` into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        ids = np.fromiter(self._vectors.keys(), dtype=np.int64, count=len(self._vectors))
        vecs = (
            np.stack([self._vectors[int(i)] for i in ids])
            if len(ids)
            else np.zeros((0, self.config.dim), np.float32)
        )
        np.save(d / "ids.npy", ids, allow_pickle=False)
        np.save(d / "vectors.npy", vecs, allow_pickle=False)
        (d / "index.json").write_text(json.dumps({"config": asdict(self.config)}))

    @classmethod
    def load(cls, directory: str | Path, config: IndexConfig | None = None) -> PriorIndex:
        """Load what :meth:`save` wrote.

        Raises:
            ValueError: The stored embedding dimension differs from ``config.dim``.
        """
        d = Path(directory)
        stored = IndexConfig(**json.loads((d / "index.json").read_text())["config"])
        cfg = config or stored
        vecs = np.load(d / "vectors.npy", allow_pickle=False)
        ids = np.load(d / "ids.npy", allow_pickle=False)
        if vecs.ndim != 2 or (len(vecs) and vecs.shape[1] != cfg.dim) or stored.dim != cfg.dim:
            raise ValueError(
                f"embedding dimension mismatch on restore: snapshot has dim {stored.dim}, "
                f"the cache expects dim {cfg.dim}"
            )
        index = cls(cfg)
        for i, v in zip(ids.tolist(), vecs, strict=True):
            index._vectors[int(i)] = v
        index._rebuild("hnsw" if len(ids) > cfg.hnsw_threshold else "flat")
        index.rebuilds = 0
        return index

    def nbytes(self) -> int:
        """Approximate bytes held by the stored vectors plus the FAISS structure."""
        per_vec = self.config.dim * 4
        n = len(self._vectors)
        graph = n * self.config.hnsw_m * 2 * 4 if self.kind == "hnsw" else 0
        return n * per_vec * 2 + graph + n * 8


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file atomically (write temp, fsync, rename)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
