"""Titans-style delta-rule memory: online key -> value associations, surprise, retrieval.

"Titans: Learning to Memorize at Test Time" (Behrouz et al., arXiv 2501.00663), linear variant.
A matrix M (r x r) learns v ~= M k online. For a pair (k, v) the surprise is the loss before the
write, l = ||M k - v||^2, with gradient g = 2 (M k - v) k^T, and the write is::

    S = eta * S - theta * g        (momentum: "past surprise")
    M = (1 - alpha) * M + S        (alpha: forgetting / weight decay)

Because the gradient is an error term, rewriting a key replaces its value (delta rule) instead of
adding to it, unlike a Hebbian memory sum(v k^T). No training is needed: embeddings are mapped to
r dims by fixed seeded random projections with orthonormal rows (separate ones for keys and
values), then L2-normalised, so the loss is scale-free and lies in [0, (|M k| + 1)^2].

Defaults (theta = 0.4, eta = 0.2, alpha = 1e-3): the effective step along a key is
2 * theta / (1 - eta) = 1, i.e. one write nearly stores an isolated pair exactly (Kaczmarz-like),
a few cycles store N << r pairs, and with N approaching or exceeding r recall degrades smoothly
to a least-squares compromise; alpha forgets a fraction 1e-3 per write (half-life ~700 writes).
State is 2 * r^2 float64 numbers (M and S) plus one pooled embedding for ``observe``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

__all__ = ["TitansMemory", "orthogonal_projection"]


@lru_cache(maxsize=4)
def orthogonal_projection(dim: int, rank: int, seed: int) -> np.ndarray:
    """(rank, dim) read-only matrix with orthonormal rows from a seeded Gaussian (rank <= dim).

    Cached: the QR costs seconds at d = 3584, r = 512, and every session with the same model and
    seed shares the same projection.
    """
    if rank > dim:
        raise ValueError(f"rank {rank} exceeds dim {dim}")
    gauss = np.random.default_rng(seed).standard_normal((dim, rank))
    q, r = np.linalg.qr(gauss)
    q *= np.sign(np.diag(r))  # unique (Haar) orthogonal factor, deterministic signs
    out = np.ascontiguousarray(q.T)
    out.flags.writeable = False
    return out


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


class TitansMemory:
    """Linear delta-rule memory with momentum and decay on projected, normalised embeddings.

    ``rank`` is clipped to ``dim`` (tiny models). ``read`` and ``surprise`` never change state.
    Keys, values and reads live in the projected r-dim space (``project_key`` / ``project_value``);
    M(q) is an index and a surprise signal, not an embedding to feed the model.
    """

    def __init__(
        self,
        dim: int,
        rank: int = 256,
        *,
        theta: float = 0.4,
        eta: float = 0.2,
        alpha: float = 1e-3,
        seed: int = 0,
    ) -> None:
        if dim <= 0 or rank <= 0:
            raise ValueError(f"dim and rank must be positive, got {dim}, {rank}")
        if not (theta > 0 and 0 <= eta < 1 and 0 <= alpha < 1):
            raise ValueError(f"need theta > 0, 0 <= eta < 1, 0 <= alpha < 1; got {theta}, {eta}, {alpha}")
        self.dim = int(dim)
        self.rank = min(int(rank), self.dim)
        self.theta = float(theta)
        self.eta = float(eta)
        self.alpha = float(alpha)
        self.seed = seed
        self.key_proj = orthogonal_projection(self.dim, self.rank, seed)
        self.value_proj = orthogonal_projection(self.dim, self.rank, seed + 1)
        self.M = np.zeros((self.rank, self.rank))
        self.S = np.zeros((self.rank, self.rank))
        self._prev: np.ndarray | None = None  # previous pooled step for observe()
        self.writes = 0

    def reset(self) -> None:
        self.M[:] = 0.0
        self.S[:] = 0.0
        self._prev = None
        self.writes = 0

    def state_bytes(self) -> int:
        """Bytes of the streaming state: M, S and the previous pooled step (slot always counted)."""
        return self.M.nbytes + self.S.nbytes + self.dim * 8

    def project_key(self, x: np.ndarray) -> np.ndarray:
        """(..., d) embedding(s) -> (..., r) unit key(s)."""
        return _normalize(np.asarray(x, dtype=np.float64) @ self.key_proj.T)

    def project_value(self, x: np.ndarray) -> np.ndarray:
        """(..., d) embedding(s) -> (..., r) unit value(s)."""
        return _normalize(np.asarray(x, dtype=np.float64) @ self.value_proj.T)

    def _kv(self, key: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projected unit key and value of one pair (lean: this is the per-write hot path)."""
        key, value = np.asarray(key), np.asarray(value)
        if key.shape != (self.dim,) or value.shape != (self.dim,):
            raise ValueError(f"key and value must be ({self.dim},), got {key.shape} and {value.shape}")
        k = self.key_proj @ key
        v = self.value_proj @ value
        nk, nv = math.sqrt(k @ k), math.sqrt(v @ v)
        return (k / nk if nk > 0 else k), (v / nv if nv > 0 else v)

    def surprise(self, key: np.ndarray, value: np.ndarray) -> float:
        """Loss ||M k - v||^2 of the pair, without writing."""
        k, v = self._kv(key, value)
        err = self.M @ k - v
        return float(err @ err)

    def write(self, key: np.ndarray, value: np.ndarray) -> float:
        """One delta-rule step on (key, value); returns the surprise (loss before the write)."""
        k, v = self._kv(key, value)
        err = self.M @ k - v
        self.S *= self.eta
        self.S -= np.outer((2.0 * self.theta) * err, k)  # -theta * grad of ||M k - v||^2
        if self.alpha:
            self.M *= 1.0 - self.alpha
        self.M += self.S
        self.writes += 1
        return float(err @ err)

    def read(self, query: np.ndarray) -> np.ndarray:
        """M k(query): the r-dim value associated with the query; no update."""
        query = np.asarray(query)
        if query.shape[-1] != self.dim:
            raise ValueError(f"query must be (..., {self.dim}), got {query.shape}")
        return self.project_key(query) @ self.M.T

    def observe(self, step_embedding: np.ndarray) -> float:
        """Predictive surprise of a visual step (n, d): key = previous pooled step, value = this one.

        Pools by the mean over tokens, writes (previous -> current) and returns the surprise, usable
        as a slot score bonus. The first step after a reset has no predecessor and returns 0.0.
        """
        x = np.asarray(step_embedding)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim or x.shape[0] == 0:
            raise ValueError(f"step embedding must be (n, {self.dim}) with n > 0, got {x.shape}")
        pooled = x.mean(axis=0, dtype=np.float64)
        prev, self._prev = self._prev, pooled
        if prev is None:
            return 0.0
        return self.write(prev, pooled)
