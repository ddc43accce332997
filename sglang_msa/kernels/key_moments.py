"""Sufficient statistics of a memory's router keys in one layer, for standardized routing
(`query_reduce` "zmax" / "zmean", see `reference.standardized_scores`).

With a head mean, a routing token's score of chunk c is linear in the chunk's key: s_t(c) = q_t · k_c,
where k_c is the chunk's key flattened over its Hkv·d features (L2-normalised per head for cosine)
and q_t the token's query summed per GQA group and scaled (1 / (H·√d) for dot, 1 / H for cosine).
So over the memory's C chunks the token's scores have

    mean  mu_t    = q_t · m,            m = (Σ_c k_c) / C
    var   sigma_t² = q_tᵀ Σ q_t,         Σ = (Σ_c k_c k_cᵀ) / C − m mᵀ

and the sums (kept in float64 by the store, `memory_manager.store`, as documents are published and
removed) give every token's mean and standard deviation without reading the keys again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang_msa.kernels import reference as ref


def scored_keys(keys: torch.Tensor, similarity: ref.Similarity) -> torch.Tensor:
    """Keys [C, Hkv, d] (float, float8 ones dequantized) as a head-mean score reads them: [C, Hkv·d]
    float64, L2-normalised per head first for cosine."""
    keys = keys.double()
    if similarity == "cosine":
        keys = torch.nn.functional.normalize(keys, dim=-1)
    return keys.reshape(keys.shape[0], -1)


@dataclass(frozen=True)
class KeyMoments:
    """count, Σ_c k_c [F] and Σ_c k_c k_cᵀ [F, F] (float64) of a set of scored keys (`scored_keys`)."""

    count: int
    key_sum: torch.Tensor
    outer_sum: torch.Tensor

    @classmethod
    def of_keys(cls, keys: torch.Tensor, similarity: ref.Similarity) -> "KeyMoments":
        flat = scored_keys(keys, similarity)
        return cls(count=flat.shape[0], key_sum=flat.sum(dim=0), outer_sum=flat.T @ flat)

    @property
    def num_features(self) -> int:
        return self.key_sum.shape[0]

    def plus(self, other: "KeyMoments") -> "KeyMoments":
        return KeyMoments(self.count + other.count, self.key_sum + other.key_sum, self.outer_sum + other.outer_sum)

    def minus(self, other: "KeyMoments") -> "KeyMoments":
        """The moments without `other`'s keys; exactly zero once no key is left (no float drift)."""
        if self.count == other.count:
            return KeyMoments(0, torch.zeros_like(self.key_sum), torch.zeros_like(self.outer_sum))
        return KeyMoments(self.count - other.count, self.key_sum - other.key_sum, self.outer_sum - other.outer_sum)

    def token_moments(self, token_queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation [T] (float64) of each token's scores q_t · k_c over the keys,
        from its query [T, F] (see the module docstring)."""
        if self.count == 0:
            raise ValueError("no keys: the scores of an empty memory have no moments")
        q = token_queries.to(device=self.key_sum.device, dtype=torch.float64)
        key_mean = self.key_sum / self.count
        covariance = self.outer_sum / self.count - torch.outer(key_mean, key_mean)
        variance = ((q @ covariance) * q).sum(dim=1).clamp_min(0.0)
        return q @ key_mean, variance.sqrt()
