"""The typed configuration of a continued pre-training run (`jtranspeft.evolve`): `EvolveConfig`.

Every default lives in ``configs/evolve/base.yaml``; recipes override it, ``key=value`` overrides both
(`jtranspeft.config_io`). The model, optimiser/loop, checkpoint, mesh and distributed sections are the
training run's own dataclasses (`jtranspeft.train_config`), so `make_optimizer` and the checkpoint code
read them unchanged; evolve adds the corpus and the per-group learning-rate multipliers.
"""

from __future__ import annotations

import dataclasses

from jtranspeft.data.corpus import SourceConfig
from jtranspeft.param_groups import GROUPS
from jtranspeft.sharding import MeshConfig
from jtranspeft.train_config import CheckpointConfig, DistributedConfig, ModelConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Named text sources with mixing weights, packed into windows of ``seq_len`` tokens."""

    seq_len: int = 128
    sources: dict[str, SourceConfig] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "sources", dict(self.sources or {}))
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not any(s.weight > 0 for s in self.sources.values()):
            raise ValueError("sources: give at least one source with weight > 0")

    def __hash__(self):
        return hash((self.seq_len, tuple(sorted(self.sources.items()))))


@dataclasses.dataclass(frozen=True)
class GroupLrConfig:
    """Learning-rate multiplier of each module group (`jtranspeft.param_groups`); 0 freezes the group."""

    attention: float = 1.0
    ffn: float = 1.0
    embeddings: float = 1.0
    norms: float = 1.0

    def __post_init__(self):
        for name in GROUPS:
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 (0 = frozen), got {value}")
        if not any(getattr(self, name) > 0 for name in GROUPS):
            raise ValueError("every group is frozen (all multipliers 0): nothing would be trained")

    def multipliers(self) -> dict[str, float]:
        """{group: multiplier} for every group."""
        return {name: getattr(self, name) for name in GROUPS}

    def trained(self) -> tuple[str, ...]:
        """The groups with a multiplier > 0."""
        return tuple(name for name in GROUPS if getattr(self, name) > 0)


@dataclasses.dataclass(frozen=True)
class EvolveConfig:
    """A whole continued pre-training run; ``train.max_steps`` null means ``train.epochs`` passes over the corpus."""

    output_dir: str = "runs/evolve"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    corpus: CorpusConfig = dataclasses.field(default_factory=lambda: CorpusConfig(
        sources={"shakespeare": SourceConfig()}))
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    groups: GroupLrConfig = dataclasses.field(default_factory=GroupLrConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
