"""Memory Parallel under tensor parallelism: this rank's place in the group that shares memories.

Under SGLang's tensor parallelism (`--tp N`) every rank runs the same batch on its slice of the
attention heads. Memories are shared over that group so:

- **Router keys are sharded by document.** Each document's router keys (all KV heads, gathered
  from the ranks at commit) are kept by one rank, the one holding the fewest router-key chunks
  so far (spec §9, "shard by documents"); routing scans only the local shard.
- **Content is sharded by head.** Every rank keeps its own KV heads of every document's pooled
  (or full-resolution) K / V: exactly the rows its attention reads, so the selected content is
  read where it lives and nothing is fetched between ranks.
- **Routing is exact.** Per routed layer the router queries are all-gathered along heads, each
  rank scores its shard and keeps its local top-k, the (score, gid) candidates are all-gathered
  and every rank takes the same global top-k of world × k candidates (ties to the lower gid).

Every method but the constructor is a collective over the group: all ranks call it in the same
order, which the scheduler guarantees (same batch, same layers, control messages broadcast in
the same step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class MemoryShard:
    rank: int
    size: int
    device_group: Any  # process group for tensors on the model's device (NCCL on GPUs, gloo on CPUs)
    cpu_group: Any  # gloo group for host-side agreement

    @classmethod
    def of_tensor_parallel_group(cls) -> "MemoryShard | None":
        """SGLang's TP group of this scheduler (built: the model runner has more than one rank),
        or None with one rank."""
        from sglang.srt.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        if group.world_size == 1:
            return None
        return cls(rank=group.rank_in_group, size=group.world_size, device_group=group.device_group,
                   cpu_group=group.cpu_group)

    def gather_heads(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, H_local, d] on every rank → [N, H_local · size, d], ranks' heads in rank order (the
        model's head order under tensor parallelism)."""
        rows = rows.contiguous()
        parts = [torch.empty_like(rows) for _ in range(self.size)]
        dist.all_gather(parts, rows, group=self.device_group)
        return torch.cat(parts, dim=1)

    def agree(self, ok: bool) -> bool:
        """True when every rank says ok."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return bool(flag.item())

    def gather_objects(self, value) -> list:
        """Every rank's `value` (picklable), in rank order."""
        gathered = [None] * self.size
        dist.all_gather_object(gathered, value, group=self.cpu_group)
        return gathered

    def global_top_k(self, gids: list[int], scores: list[float], k: int) -> tuple[list[int], list[float]]:
        """The best k of every rank's local candidates, best first, ties to the lower gid; the
        same list on every rank."""
        local = torch.full((k, 2), float("-inf"), dtype=torch.float64)
        for row, (gid, score) in enumerate(zip(gids[:k], scores[:k])):
            local[row, 0], local[row, 1] = score, gid
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.cpu_group)
        pool = [(float(s), int(g)) for part in parts for s, g in part.tolist() if s != float("-inf")]
        best = sorted(pool, key=lambda c: (-c[0], c[1]))[:k]
        return [g for _, g in best], [s for s, _ in best]
