"""The parallel layout of a run: degrees, this rank's coordinates, and the DeviceMesh.

World = pp x dp_replicate x dp_shard x cp x tp, in that mesh order (torchtitan's): tensor parallelism,
the most communication-heavy, varies fastest, so its ranks are neighbours (the same host, NVLink);
pipeline stages, which exchange only activations, vary slowest.

Only dimensions of size > 1 are in the mesh (a size-1 dimension would only add process groups),
except `dp_shard`, kept whenever there are data-parallel replicas so that HSDP always has its 2-D
(replicate, shard) mesh. Groups used together are flattened into named dimensions:

    dp           dp_replicate x dp_shard        which samples a rank reads
    dp_shard_cp  dp_shard x cp                  what FSDP shards over (a CP rank holds its own shard too)
    dp_cp        dp_replicate x dp_shard x cp   what the loss is averaged over

Expert parallelism (`ep` > 1, MoE families) borrows its ranks from dp_shard, as torchtitan's does: the
dp_shard dimension is built as two, efsdp x ep (ep varying fastest, so an all-to-all group is
neighbours), and `dp_shard` is their flattening, so every other group is the one the same layout has
without ep and the ranks read the same samples. A MoE block's experts are split over `ep` along the
expert dimension and FSDP-sharded over `efsdp` (the ranks holding the same experts; with replicas,
`expert_fsdp` = dp_replicate x efsdp, HSDP); everything else is sharded over dp_shard as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from llamatron.config import ParallelConfig, pp_schedule_name, resolve_dp_shard


@dataclass
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallel: divides dp_shard (= efsdp x ep, see the module doc)
    pp_virtual_stages: int = 1
    pp_schedule: str = "1f1b"
    world_size: int = 1
    mesh: DeviceMesh | None = field(default=None, repr=False)
    _submeshes: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, p: ParallelConfig, world_size: int) -> "ParallelDims":
        return cls(dp_replicate=p.dp_replicate, dp_shard=resolve_dp_shard(p, world_size), cp=p.cp, tp=p.tp,
                   pp=p.pp, ep=p.ep, pp_virtual_stages=p.pp_virtual_stages, pp_schedule=pp_schedule_name(p),
                   world_size=world_size)

    # Degrees of the groups that are used together.
    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        """FSDP (or HSDP) wraps the model whenever any rank shares its parameters with another."""
        return self.dp_replicate * self.dp_shard * self.cp > 1

    def describe(self) -> str:
        parts = [f"{k} {getattr(self, k)}" for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep") if getattr(self, k) > 1]
        if self.pp > 1:
            parts.append(f"{self.pp_schedule} with {self.pp_virtual_stages} stage(s) per rank")
        return f"{self.world_size} process(es)" + (": " + ", ".join(parts) if parts else "")

    def sharding(self) -> dict[str, int]:
        """How each parameter (and its optimizer state) is cut across ranks: pipeline stages and HSDP
        replicas hold whole shards of it, so they are not part of it."""
        return {"dp_shard x cp": self.dp_shard * self.cp if self.fsdp_enabled else 1, "tp": self.tp, "ep": self.ep}

    @property
    def efsdp(self) -> int:
        """The FSDP degree of the experts under expert parallelism: dp_shard ranks holding the same experts."""
        return self.dp_shard // self.ep

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        if self.world_size == 1:
            return None
        shard = [("efsdp", self.efsdp), ("ep", self.ep)] if self.ep > 1 else [("dp_shard", self.dp_shard)]
        dims = [("pp", self.pp), ("dp_replicate", self.dp_replicate), *shard, ("cp", self.cp), ("tp", self.tp)]
        # HSDP's meshes are 2-D (replicate, shard) even where the shard degree is 1: the experts' too.
        keep = [(n, s) for n, s in dims if s > 1 or (n in ("dp_shard", "efsdp") and self.dp_replicate > 1)]
        self.mesh = init_device_mesh(device_type, tuple(s for _, s in keep), mesh_dim_names=tuple(n for n, _ in keep))
        names = [n for n, _ in keep]
        members = tuple(n for n, _ in shard)
        by_members = {}  # the same dimensions are flattened once, whatever the names asking for them
        for flat, group in (("dp_shard", members), ("dp", ("dp_replicate", *members)), ("dp_shard_cp", (*members, "cp")),
                            ("dp_cp", ("dp_replicate", *members, "cp"))):
            present = tuple(m for m in group if m in names)
            if len(present) == 1:
                self._submeshes[flat] = self.mesh[present[0]]
            elif len(present) > 1:
                if present not in by_members:
                    by_members[present] = self.mesh[present]._flatten(mesh_dim_name=flat)
                self._submeshes[flat] = by_members[present]
        for n in names:
            self._submeshes.setdefault(n, self.mesh[n])
        shard_name = self._submeshes["dp_shard_cp"].mesh_dim_names[0] if "dp_shard_cp" in self._submeshes else None
        if self.dp_replicate > 1:  # HSDP: replicate across the first dimension, shard across the second
            self._submeshes["fsdp"] = self.mesh["dp_replicate", shard_name]
            if self.ep > 1:
                self._submeshes["expert_fsdp"] = self.mesh["dp_replicate", "efsdp"]
        else:
            if shard_name is not None:
                self._submeshes["fsdp"] = self._submeshes["dp_shard_cp"]
            if "efsdp" in names:
                self._submeshes["expert_fsdp"] = self.mesh["efsdp"]
        return self.mesh

    def submesh(self, name: str) -> DeviceMesh | None:
        """The named (possibly flattened) mesh dimension, or None where its size is 1."""
        return self._submeshes.get(name)

    def group(self, name: str):
        m = self.submesh(name)
        return m.get_group() if m is not None and m.ndim == 1 else None

    def first_last_group(self):
        """The group of the first and the last pipeline rank at this rank's other coordinates (the
        holders of a tied model's first and last stage: Megatron's embedding group); None on the
        ranks in between and without pipelining. Every rank must call it (it creates groups)."""
        if self.pp == 1:
            return None
        if self.pp == 2:
            return self.group("pp")
        # pp is the mesh's slowest dimension: column j of this view is one pipeline, first to last.
        lines = self.mesh.mesh.reshape(self.pp, -1)
        mine = None
        for first, last in zip(lines[0].tolist(), lines[-1].tolist()):
            group = dist.new_group([first, last])  # every rank creates every group, in one order
            if self.rank in (first, last):
                mine = group
        return mine

    def local_rank(self, name: str) -> int:
        m = self.submesh(name)
        return m.get_local_rank() if m is not None else 0

    @property
    def dp_rank(self) -> int:
        return self.local_rank("dp")

    @property
    def pp_rank(self) -> int:
        return self.local_rank("pp")

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0
