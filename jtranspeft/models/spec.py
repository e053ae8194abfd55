"""Architecture facts of a decoder checkpoint, read from a Hugging Face ``config.json`` dict.

`ModelSpec` is the single description the decoder, the key tables and the adapters work from:
llama, qwen2, qwen3, mistral and gemma3 differ only through its fields (biases, q/k norms, rope variant,
tied embeddings; for Gemma 3 also (1 + w) norms, four norms per layer, scaled embeddings, GeGLU, a query
scale, final-logit softcapping, and sliding-window layers with their own rope base). Both config forms are
read: transformers-5 ``rope_parameters`` and the older top-level ``rope_theta`` / ``rope_scaling``. Anything
we cannot honour exactly is a `SpecError` naming the field; nothing is approximated silently. GGUF files reach
this module through `jtranspeft.checkpoints.gguf.read_gguf_config`, which produces the same kind of dict.

This module also holds THE table of a decoder layer's projections (`PROJECTIONS`): each one's Hugging Face
name, the sub-block that holds it (``self_attn`` or ``mlp``: also its place in our params tree and in
HF tensor names), its module group (attention or ffn), and the widths that set its input and output
features, each with its logical sharding axis. Everything that needs module names, groups, full HF names
or projection shapes (key tables, adapters, sharding, FLOP counts, fingerprints, drift, transfer) reads it
from here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from jtranspeft.utils.errors import InputError
from jtranspeft.utils.validate import Fields, read_json_object

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
ROPE_TYPES = ("default", "llama3")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # SwiGLU, GeGLU (tanh-approximated GELU)
LAYER_TYPES = ("full_attention", "sliding_attention")
# config.json model_type -> family, where they differ (Gemma 3's text model is "gemma3_text").
_MODEL_TYPES = {"gemma3_text": "gemma3"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "mistral": "MistralForCausalLM", "gemma3": "Gemma3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class Width:
    """A feature width of the architecture: the `ModelSpec` property giving it, how messages name it, and
    the logical axis (`jtranspeft.training.sharding`) a dimension of that width carries."""

    attribute: str
    label: str
    axis: str


WIDTHS = {
    "hidden": Width("hidden_size", "hidden_size", "embed"),
    "q": Width("q_size", "num_heads*head_dim", "heads"),
    "kv": Width("kv_size", "num_kv_heads*head_dim", "kv_heads"),
    "intermediate": Width("intermediate_size", "intermediate_size", "mlp"),
}


@dataclasses.dataclass(frozen=True)
class ProjectionInfo:
    """One projection of a decoder layer: HF name, sub-block, module group, input and output width."""

    name: str
    block: str  # "self_attn" | "mlp": the sub-block holding it (params tree and HF names)
    group: str  # "attention" | "ffn"
    d_in: str  # a key of WIDTHS
    d_out: str


PROJECTIONS = (
    ProjectionInfo("q_proj", "self_attn", "attention", "hidden", "q"),
    ProjectionInfo("k_proj", "self_attn", "attention", "hidden", "kv"),
    ProjectionInfo("v_proj", "self_attn", "attention", "hidden", "kv"),
    ProjectionInfo("o_proj", "self_attn", "attention", "q", "hidden"),
    ProjectionInfo("gate_proj", "mlp", "ffn", "hidden", "intermediate"),
    ProjectionInfo("up_proj", "mlp", "ffn", "hidden", "intermediate"),
    ProjectionInfo("down_proj", "mlp", "ffn", "intermediate", "hidden"),
)
PROJECTION = {p.name: p for p in PROJECTIONS}
TARGET_MODULES = tuple(p.name for p in PROJECTIONS)  # canonical order everywhere
ATTN_MODULES = tuple(p.name for p in PROJECTIONS if p.group == "attention")
MLP_MODULES = tuple(p.name for p in PROJECTIONS if p.group == "ffn")
MODULE_BLOCK = {p.name: p.block for p in PROJECTIONS}  # "q_proj" -> "self_attn"
# The four module groups every parameter belongs to (`jtranspeft.models.params.param_group`).
GROUPS = ("attention", "ffn", "embeddings", "norms")
_HF_LAYER = "model.layers.{i}"
_HF_MODULE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<module>\w+)$")


def hf_module_name(module: str, layer: int | str = "{i}") -> str:
    """Full Hugging Face name of a projection, e.g. ``model.layers.3.self_attn.q_proj`` (``{i}`` by default)."""
    return f"{_HF_LAYER.format(i=layer)}.{MODULE_BLOCK[module]}.{module}"


def parse_hf_module_name(name: str) -> tuple[str, int] | None:
    """(module, layer) of a full projection name such as ``model.layers.3.self_attn.q_proj``; None otherwise
    (another module, or a projection under the wrong sub-block)."""
    match = _HF_MODULE.match(name)
    if match is None or match["module"] not in PROJECTION or MODULE_BLOCK[match["module"]] != match["block"]:
        return None
    return match["module"], int(match["layer"])


class SpecError(InputError):
    """An architecture or config value jtranspeft does not support; the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters; ``rope_type`` "llama3" uses the four scaling fields."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the decoder needs to know about an architecture (hashable, usable as a jit static)."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeSpec = RopeSpec()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    hidden_act: str = "silu"  # one of ACTIVATIONS: the gate of the gated FFN
    norm_offset: bool = False  # RMSNorms scale by (1 + w), w stored zero-centred (gemma)
    sandwich_norms: bool = False  # also norm each sub-block's output: four norms per layer (gemma3)
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), rounded to the embedding dtype (gemma)
    query_pre_attn_scalar: float | None = None  # attention scores scaled by its -1/2 power, not head_dim's
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    # Per layer "full_attention" or "sliding_attention" (the latter sees the last `sliding_window` slots);
    # None: every layer is full (mistral: all slide when sliding_window is set; qwen2/qwen3: those the config says).
    layer_types: tuple[str, ...] | None = None
    rope_local: RopeSpec | None = None  # rope of the sliding layers (gemma3); None: `rope` everywhere

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise SpecError(f"model_type {self.family!r} is not supported; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise SpecError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise SpecError(f"hidden_act {self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_layers:
                raise SpecError(f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is "
                                f"{self.num_layers}")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise SpecError(f"layer_types holds {unknown}; supported: {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and (self.sliding_window is None or self.sliding_window < 1):
                raise SpecError(f"sliding_window must be an integer >= 1 for sliding_attention layers, got "
                                f"{self.sliding_window!r}")

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether its attention is limited to the last `sliding_window` slots."""
        return tuple(kind == "sliding_attention" for kind in self.layer_types or ("full_attention",) * self.num_layers)

    @property
    def attention_scale(self) -> float:
        """The factor on q . k: ``query_pre_attn_scalar ** -0.5`` when set, else ``head_dim ** -0.5``."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """The per-layer RMSNorms (HF names): before attention and FFN, and after each with sandwich norms."""
        return ("input_layernorm", "post_attention_layernorm") + (
            ("pre_feedforward_layernorm", "post_feedforward_layernorm") if self.sandwich_norms else ())

    @property
    def q_size(self) -> int:
        """Width of the query projection output (heads * head_dim)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key and value projection outputs (kv_heads * head_dim)."""
        return self.num_kv_heads * self.head_dim

    def width(self, name: str) -> int:
        """The size of one of the `WIDTHS` ("hidden", "q", "kv", "intermediate")."""
        return getattr(self, WIDTHS[name].attribute)

    def projection_shape(self, module: str) -> tuple[int, int]:
        """(in, out) features of one projection, e.g. ``(hidden_size, num_heads * head_dim)`` for q_proj."""
        info = PROJECTION[module]
        return self.width(info.d_in), self.width(info.d_out)

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each of the seven projections of one decoder layer."""
        return {m: self.projection_shape(m) for m in TARGET_MODULES}

    @property
    def num_params(self) -> int:
        """Parameter count of the base: embeddings (and an untied head), every layer's projections, biases and
        norms, and the final norm (the tensors of `jtranspeft.checkpoints.hf.KEY_TABLE`)."""
        d = self.hidden_size
        per_layer = sum(i * o for i, o in self.projection_shapes().values()) + len(self.layer_norms) * d
        per_layer += (self.q_size + 2 * self.kv_size) * self.qkv_bias + d * self.o_bias
        per_layer += 2 * self.head_dim * self.qk_norm
        return self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * per_layer + d

    def to_hf_config(self) -> dict[str, Any]:
        """The transformers ``config.json`` dict for this spec (transformers-5 ``rope_parameters`` form)."""
        rope = _rope_dict(self.rope)
        model_type = {family: model_type for model_type, family in _MODEL_TYPES.items()}.get(self.family, self.family)
        cfg: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.family]], "model_type": model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope, "rope_theta": self.rope.theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
        }
        if self.family in ("llama", "qwen3", "gemma3"):
            cfg["attention_bias"] = self.qkv_bias
        if self.family in ("qwen2", "qwen3", "mistral", "gemma3"):
            cfg["sliding_window"] = self.sliding_window
        if self.family in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = any(self.sliding_layers)
            cfg["layer_types"] = list(self.layer_types or ("full_attention",) * self.num_layers)
        if self.family == "gemma3":
            del cfg["hidden_act"], cfg["rope_theta"]
            cfg.update(hidden_activation=self.hidden_act, layer_types=list(self.layer_types or ()),
                       rope_parameters={"full_attention": rope,
                                        "sliding_attention": _rope_dict(self.rope_local or self.rope)},
                       query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),
                       final_logit_softcapping=self.final_logit_softcapping)
        return cfg


def _int_if_whole(value: float | None) -> int | float | None:
    """``value`` as an int when it is a whole number (transformers' config classes type some such fields int)."""
    return int(value) if value is not None and float(value).is_integer() else value


def _rope_dict(rope: RopeSpec) -> dict[str, Any]:
    """A `RopeSpec` as a transformers ``rope_parameters`` dict."""
    out: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type == "llama3":
        out.update(factor=rope.factor, low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position_embeddings)
    return out


def _rope_params(f: "Fields", name: str) -> dict[str, Any] | None:
    """One rope dict (``rope_parameters`` or the older ``rope_scaling``) with ``type`` read as ``rope_type``."""
    params = f.get(name, dict, None, nullable=True)
    if not params:
        return None
    params = dict(params)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    return params


def _rope_from_config(f: "Fields") -> RopeSpec:
    new, old = _rope_params(f, "rope_parameters"), _rope_params(f, "rope_scaling")
    if new is not None and old is not None:
        differ = {k for k in set(new) & set(old) if new[k] != old[k]}
        if differ or new.get("rope_type", "default") != old.get("rope_type", "default"):
            raise f.error("rope_scaling", f"{old} disagrees with rope_parameters {new}; transformers would apply "
                                          "one of them, keep only one")
    return _rope_spec(new or old or {}, f, "rope_parameters", f.get("rope_theta", float, 10000.0))


def _rope_spec(params: dict[str, Any], f: "Fields", field: str, default_theta: float) -> RopeSpec:
    """One checked rope dict (``rope_type``, ``rope_theta`` and llama3's scaling keys) read from ``field``."""
    theta = params.get("rope_theta", default_theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise SpecError(f"rope type {rope_type!r} (field {field}.rope_type / rope_scaling.type) "
                        f"is not supported; supported: {', '.join(ROPE_TYPES)}")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise f.error(f"{field}.rope_theta" if "rope_theta" in params else "rope_theta",
                      f"must be a positive number, got {theta!r}")
    if rope_type == "default":
        return RopeSpec(theta=float(theta))
    rope = Fields(params, f.path, f"{field}.")
    return RopeSpec(theta=float(theta), rope_type=rope_type, factor=rope.get("factor", float, minimum=1.0),
                    low_freq_factor=rope.get("low_freq_factor", float, minimum=0.0),
                    high_freq_factor=rope.get("high_freq_factor", float, minimum=0.0),
                    original_max_position_embeddings=rope.get("original_max_position_embeddings", int, minimum=1))


def _sliding_layers(f: "Fields", family: str, num_layers: int) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) of a llama / qwen2 / qwen3 / mistral config, as transformers applies them:
    mistral slides on every layer when ``sliding_window`` is set; qwen2 and qwen3 only with
    ``use_sliding_window``, on the layers ``layer_types`` names (or, without it, from ``max_window_layers`` on);
    llama never. layer_types is None when no layer slides."""
    window = f.get("sliding_window", int, None, minimum=1)
    if family == "mistral" and window is not None:
        return window, ("sliding_attention",) * num_layers
    if family not in ("qwen2", "qwen3") or window is None or not f.get("use_sliding_window", bool, False):
        return window, None
    layer_types = f.get("layer_types", list, None, nullable=True)
    if layer_types is None:
        first = f.get("max_window_layers", int, 28, minimum=0)
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    unknown = sorted({str(t) for t in layer_types} - set(LAYER_TYPES))
    if unknown:
        raise SpecError(f"{f.path}: field layer_types holds {unknown}; supported: {', '.join(LAYER_TYPES)}")
    return window, tuple(layer_types) if "sliding_attention" in layer_types else None


GEMMA3_SLIDING_PATTERN = 6  # Gemma 3's convention: of every 6 layers, 5 slide and the 6th is global


def gemma3_layer_types(num_layers: int, pattern: int = GEMMA3_SLIDING_PATTERN) -> tuple[str, ...]:
    """Gemma 3's default layer types: every ``pattern``-th layer global, the others sliding."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers))


def _gemma3_fields(f: "Fields", num_layers: int) -> dict[str, Any]:
    """The `ModelSpec` fields only Gemma 3 configs set: layer types, window, both ropes, scales, softcap.

    Both config forms are read: transformers-5 ``rope_parameters`` keyed by layer type, and the older
    ``rope_theta`` (global) / ``rope_local_base_freq`` (sliding) / ``rope_scaling`` (global).
    """
    path = f.path
    if f.get("attn_logit_softcapping", float, None, nullable=True) is not None:
        raise SpecError(f"{path}: field attn_logit_softcapping is set, but transformers' Gemma3ForCausalLM never "
                        "applies it (Gemma 2 did); we refuse rather than guess which model was meant")
    if f.get("use_bidirectional_attention", bool, False, nullable=True):
        raise SpecError(f"{path}: use_bidirectional_attention=true is not supported (a causal decoder only)")
    layer_types = f.get("layer_types", list, None, nullable=True)
    if layer_types is None:
        layer_types = gemma3_layer_types(num_layers, f.get("sliding_window_pattern", int, GEMMA3_SLIDING_PATTERN,
                                                           minimum=1))
    unknown = sorted({str(t) for t in layer_types} - set(LAYER_TYPES))
    if unknown:
        raise SpecError(f"{path}: field layer_types holds {unknown}; supported: {', '.join(LAYER_TYPES)}")
    window = f.get("sliding_window", int, None, nullable=True)
    if "sliding_attention" in layer_types and (window is None or window <= 0):
        raise SpecError(f"{path}: field sliding_window must be an integer >= 1 for sliding_attention layers, "
                        f"got {window!r}")
    params = f.get("rope_parameters", dict, None, nullable=True)
    if params is not None and set(params) & set(LAYER_TYPES):  # one rope dict per layer type
        ropes = {}
        for kind in sorted(set(layer_types)):
            if not isinstance(params.get(kind), dict):
                raise SpecError(f"{path}: field rope_parameters.{kind} is missing; the {kind} layers need a rope")
            ropes[kind] = _rope_spec(params[kind], f, f"rope_parameters.{kind}", 10000.0)
        rope, rope_local = ropes.get("full_attention", RopeSpec()), ropes.get("sliding_attention")
    else:
        rope = _rope_spec(params or _rope_params(f, "rope_scaling") or {}, f, "rope_parameters",
                          f.get("rope_theta", float, 1_000_000.0, minimum=0.0))
        rope_local = RopeSpec(theta=f.get("rope_local_base_freq", float, 10000.0, minimum=0.0))

    def positive(name: str) -> float | None:
        value = f.get(name, float, None, nullable=True)
        if value is not None and value <= 0:
            raise SpecError(f"{path}: field {name} must be positive or null, got {value!r}")
        return value

    return dict(layer_types=tuple(layer_types), sliding_window=window, rope=rope, rope_local=rope_local,
                hidden_act=f.get("hidden_activation", str, f.get("hidden_act", str, "gelu_pytorch_tanh")),
                norm_offset=True, sandwich_norms=True, embed_scale=True, qk_norm=True,
                query_pre_attn_scalar=positive("query_pre_attn_scalar"),
                final_logit_softcapping=positive("final_logit_softcapping"),
                tie_word_embeddings=f.get("tie_word_embeddings", bool, True))


def spec_from_hf_config(cfg: dict[str, Any], path: str | Path = "config.json") -> ModelSpec:
    """Build a `ModelSpec` from a transformers ``config.json`` dict read from ``path`` (named in errors).

    Every field is type- and range-checked; a value we cannot honour exactly (another activation, MLP bias,
    partial rotary embeddings, an unsupported or contradictory rope) raises `SpecError`.
    """
    f = Fields(cfg, path)
    model_type = f.get("model_type", str, None, nullable=True)
    family = _MODEL_TYPES.get(model_type, model_type)
    if model_type == "gemma3":
        raise SpecError(f"{path}: model_type 'gemma3' is the multimodal Gemma 3 (Gemma3ForConditionalGeneration); "
                        "only its text model is supported: a checkpoint with model_type 'gemma3_text' "
                        "(Gemma3ForCausalLM)")
    if family not in FAMILIES:
        raise SpecError(f"{path}: model_type {model_type!r} (architectures {cfg.get('architectures')}) is not "
                        f"supported; supported: {', '.join(FAMILIES)} (gemma3 as 'gemma3_text')")
    act = f.get("hidden_act", str, "silu")
    if act != "silu" and family != "gemma3":
        raise SpecError(f"{path}: hidden_act {act!r} is not supported (only 'silu')")
    if f.get("mlp_bias", bool, False):
        raise SpecError(f"{path}: mlp_bias=true is not supported")
    if f.get("pretraining_tp", int, 1) != 1:
        raise SpecError(f"{path}: pretraining_tp != 1 is not supported")
    if f.get("partial_rotary_factor", float, 1.0) != 1.0:
        raise SpecError(f"{path}: partial_rotary_factor={cfg['partial_rotary_factor']} is not supported "
                        "(rotary embeddings on part of each head would be computed wrongly)")
    num_heads = f.get("num_attention_heads", int, minimum=1)
    hidden = f.get("hidden_size", int, minimum=1)
    head_dim = f.get("head_dim", int, None, minimum=1) or hidden // num_heads
    num_layers = f.get("num_hidden_layers", int, minimum=1)
    gemma3 = _gemma3_fields(f, num_layers) if family == "gemma3" else {}
    window, layer_types = (None, None) if gemma3 else _sliding_layers(f, family, num_layers)
    attention_bias = family in ("llama", "qwen3", "gemma3") and f.get("attention_bias", bool, False)
    eos = f.get("eos_token_id", (int, list), None)
    if isinstance(eos, list) and not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise f.error("eos_token_id", f"must be an integer or a list of integers, got {eos!r}")
    fields = dict(
        family=family,
        vocab_size=f.get("vocab_size", int, minimum=1),
        hidden_size=hidden,
        intermediate_size=f.get("intermediate_size", int, minimum=1),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=f.get("num_key_value_heads", int, num_heads, minimum=1),
        head_dim=head_dim,
        rms_norm_eps=f.get("rms_norm_eps", float, 1e-6, minimum=0.0),
        rope=None if gemma3 else _rope_from_config(f),
        tie_word_embeddings=f.get("tie_word_embeddings", bool, False),
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=attention_bias,
        qk_norm=family == "qwen3",
        sliding_window=window,
        layer_types=layer_types,
        max_position_embeddings=f.get("max_position_embeddings", int, 4096, minimum=1),
        bos_token_id=f.get("bos_token_id", int, None),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )
    return ModelSpec(**{**fields, **gemma3})


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """Read ``config.json`` from an HF checkpoint directory (a JSON object; errors name the file and line)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json is missing; an HF checkpoint directory needs one")
    return read_json_object(path)
