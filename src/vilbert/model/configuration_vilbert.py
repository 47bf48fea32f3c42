"""ViLBERTConfig: the model hyper-parameters, named like the keys of the official JSON configs."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from vilbert.errors import ConfigError, SourceNotFoundError

logger = logging.getLogger(__name__)

# Keys the official code reads nowhere (or only in code paths no released model uses). They are accepted
# so the released JSON files load, and kept so `to_json_file` writes them back.
DEAD_KEYS = ("bi_intermediate_size", "bi_attention_type", "pooling_method", "visualization", "num_negative",
             "fixed_v_layer", "predict_feature", "intra_gate", "fast_mode", "in_batch_pairs", "finetuning_task",
             "num_labels", "output_attentions", "output_hidden_states", "torchscript")

# Constants of the official code that are not config keys.
LAYER_NORM_EPS = 1e-12  # BertLayerNorm / FusedLayerNorm eps everywhere in ViLBERT
NUM_LOCATIONS = 5  # [x1/W, y1/H, x2/W, y2/H, area]
NUM_TASK_TOKENS = 20  # MT `task_embeddings = nn.Embedding(20, hidden)`


@dataclass(frozen=True)
class ViLBERTConfig:
    """Hyper-parameters of ViLBERT; defaults equal the released `bert_base_6layer_6conect.json`.

    Field names are the keys of the official JSON configs (beta and vilbert-multi-task). Keys the official
    code never reads (``DEAD_KEYS``) are accepted and ignored by the model. Lists are stored as tuples.
    """

    # --- text stream (BERT-base) ---
    vocab_size: int = 30522  # word-piece vocabulary of the text checkpoint
    hidden_size: int = 768  # text width
    num_hidden_layers: int = 12  # text layers (self-attention + FFN)
    num_attention_heads: int = 12  # text heads
    intermediate_size: int = 3072  # text FFN width
    hidden_act: str = "gelu"  # text activation: gelu (erf), relu, gelu_tanh
    hidden_dropout_prob: float = 0.1  # text residual dropout
    attention_probs_dropout_prob: float = 0.1  # text attention-probability dropout
    max_position_embeddings: int = 512  # text positions
    type_vocab_size: int = 2  # segment ids
    initializer_range: float = 0.02  # std of the normal init of every Linear/Embedding
    # --- visual stream ---
    v_feature_size: int = 2048  # detector region-feature width
    v_target_size: int = 1601  # region-class head size (1600 VG classes + background); 2048 for visual_target 1
    v_hidden_size: int = 1024  # visual width
    v_num_hidden_layers: int = 6  # visual layers
    v_num_attention_heads: int = 8  # visual heads
    v_intermediate_size: int = 1024  # visual FFN width
    v_attention_probs_dropout_prob: float = 0.1  # visual attention-probability dropout
    v_hidden_dropout_prob: float = 0.1  # visual residual dropout
    v_hidden_act: str = "gelu"  # visual activation
    v_initializer_range: float = 0.02  # read by nothing in the official init (initializer_range is used)
    # --- co-attention ---
    bi_hidden_size: int = 1024  # co-attention Q/K/V width and pooler width
    bi_num_attention_heads: int = 8  # co-attention heads
    bi_intermediate_size: int = 1024  # dead key
    bi_attention_type: int = 1  # dead key
    v_biattention_id: tuple[int, ...] = (0, 1, 2, 3, 4, 5)  # visual layer index each co-layer precedes
    t_biattention_id: tuple[int, ...] = (6, 7, 8, 9, 10, 11)  # text layer index each co-layer precedes
    pooling_method: str = "mul"  # dead key (the code reads fusion_method)
    fusion_method: str = "mul"  # fuse pooled [CLS] and [IMG]: "mul" or "sum"
    with_coattention: bool = True  # only True is supported (every released model)
    dynamic_attention: bool = False  # only False is supported (off in every released model)
    # --- training switches of the official code ---
    fast_mode: bool = False  # dead here: use ViLBERTModel.encode_text_prefix for retrieval scoring
    in_batch_pairs: bool = False  # never enabled officially; not supported
    fixed_t_layer: int = 0  # text layers [0, fixed_t_layer) run without gradient
    fixed_v_layer: int = 0  # dead key
    visual_target: int = 0  # 0: KL to detector class distribution; 1: MSE to the region feature
    objective: int = 0  # 0: all losses on all pairs; 1: masked losses only on aligned pairs; 2: no alignment loss
    num_negative: int = 128  # dead key (visual_target 2 only)
    model: str = "bert"  # text-stream family; only "bert" is supported (the MT RoBERTa variant is not)
    task_specific_tokens: bool = False  # insert a task embedding after [CLS] (multi_task_model.bin)
    visualization: bool = False  # dead key
    # --- beta-only keys ---
    predict_feature: bool = False  # dead key (beta)
    intra_gate: bool = False  # dead key (beta)
    # --- keys of transformers' PretrainedConfig found in roberta_base_6layer_6connect.json ---
    layer_norm_eps: float = LAYER_NORM_EPS  # only 1e-12 is supported (the value every config uses)
    finetuning_task: str | None = None  # dead key
    num_labels: int = 2  # dead key (task heads take num_labels as an argument)
    output_attentions: bool = False  # dead key
    output_hidden_states: bool = False  # dead key
    torchscript: bool = False  # dead key

    def __post_init__(self) -> None:
        for name in ("v_biattention_id", "t_biattention_id"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) for i in value):
                raise ConfigError(f"ViLBERTConfig.{name} must be a list of layer indices, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Check cross-field consistency.

        Raises:
            ConfigError: a width not divisible by its heads, a co-attention schedule that does not fit the
                layer counts, or an unknown fusion method.
        """
        for width, heads, what in ((self.hidden_size, self.num_attention_heads, "hidden_size/num_attention_heads"),
                                   (self.v_hidden_size, self.v_num_attention_heads, "v_hidden_size/v_num_attention_heads"),
                                   (self.bi_hidden_size, self.bi_num_attention_heads, "bi_hidden_size/bi_num_attention_heads")):
            if heads <= 0 or width % heads:
                raise ConfigError(f"ViLBERTConfig: {what} = {width}/{heads} is not a whole head size")
        v_ids, t_ids = self.v_biattention_id, self.t_biattention_id
        if len(v_ids) != len(t_ids):
            raise ConfigError(f"ViLBERTConfig: v_biattention_id {list(v_ids)} and t_biattention_id {list(t_ids)} "
                              "must have the same length (one entry per co-attention layer)")
        for ids, n, name in ((v_ids, self.v_num_hidden_layers, "v"), (t_ids, self.num_hidden_layers, "t")):
            if any(b <= a for a, b in zip(ids, ids[1:])) or any(i < 0 or i > n for i in ids):
                raise ConfigError(f"ViLBERTConfig: {name}_biattention_id {list(ids)} must be increasing indices "
                                  f"in [0, {n}] ({'v_num_hidden_layers' if name == 'v' else 'num_hidden_layers'} = {n})")
        if self.fusion_method not in ("mul", "sum"):
            raise ConfigError(f"ViLBERTConfig.fusion_method must be 'mul' or 'sum', got {self.fusion_method!r}")
        if self.visual_target not in (0, 1, 2):
            raise ConfigError(f"ViLBERTConfig.visual_target must be 0, 1 or 2, got {self.visual_target!r}")
        if self.layer_norm_eps != LAYER_NORM_EPS:
            raise ConfigError(f"ViLBERTConfig.layer_norm_eps must be {LAYER_NORM_EPS} (as in every released model), "
                              f"got {self.layer_norm_eps}")
        if self.visual_target == 1 and self.v_target_size != self.v_feature_size:
            raise ConfigError(f"ViLBERTConfig: visual_target=1 regresses the region feature, so v_target_size "
                              f"must equal v_feature_size ({self.v_feature_size}), got {self.v_target_size}")
        if self.fixed_t_layer > (self.t_biattention_id[0] if self.t_biattention_id else self.num_hidden_layers):
            raise ConfigError(f"ViLBERTConfig.fixed_t_layer={self.fixed_t_layer} would freeze text layers after "
                              "the first co-attention layer; the official --freeze allows at most "
                              "t_biattention_id[0]")
        if self.objective not in (0, 1, 2):
            raise ConfigError(f"ViLBERTConfig.objective must be 0, 1 or 2, got {self.objective!r}")

    @property
    def num_co_layers(self) -> int:
        """Number of co-attention (Co-TRM) layers."""
        return len(self.t_biattention_id)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "dict") -> "ViLBERTConfig":
        """Build a config from official-style keys; defaults fill the absent ones.

        Args:
            data: key -> value, as in the official JSON files.
            source: where `data` came from, for error messages.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones) or an inconsistent value.
        """
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"{source}: unknown ViLBERT config key(s) {unknown}; valid keys are {sorted(valid)}")
        try:
            return cls(**data)
        except TypeError as exc:  # pragma: no cover - guarded by the key check above
            raise ConfigError(f"{source}: {exc}") from exc

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ViLBERTConfig":
        """Read an official JSON config such as `bert_base_6layer_6conect.json`.

        Args:
            path: JSON file with a flat object of config keys.

        Raises:
            SourceNotFoundError: the file does not exist.
            ConfigError: the file is not a JSON object, or has an unknown key or a bad value.
        """
        path = Path(path)
        if not path.is_file():
            raise SourceNotFoundError(f"{path}: ViLBERT config file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not a valid JSON file ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object of config keys, found {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-ready values (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json_string(self) -> str:
        """The config as indented, key-sorted JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write the config as JSON atomically (temp file, fsync, rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_json_string())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def replace(self, **changes: Any) -> "ViLBERTConfig":
        """A copy with some fields changed (validated like a new config)."""
        return self.from_dict({**self.to_dict(), **changes}, source="ViLBERTConfig.replace")

    @classmethod
    def from_name(cls, name: str, **changes: Any) -> "ViLBERTConfig":
        """A named config from ``NAMED_CONFIGS`` ('base', 'small', 'tiny'), optionally changed.

        Raises:
            ConfigError: an unknown name (the message lists the valid ones).
        """
        if name not in NAMED_CONFIGS:
            raise ConfigError(f"unknown ViLBERT config name {name!r}; valid names are {sorted(NAMED_CONFIGS)}")
        config = NAMED_CONFIGS[name]()
        return config.replace(**changes) if changes else config


def _base() -> ViLBERTConfig:
    return ViLBERTConfig()


def _small() -> ViLBERTConfig:
    # Text stream of the MiniLM's shape (all-MiniLM-L6-v2: 6 layers, 384 wide, 12 heads, FFN 1536):
    # 4 text-only layers, then 2 co-attention layers each followed by one text and one visual layer.
    return ViLBERTConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                         v_hidden_size=256, v_num_hidden_layers=2, v_num_attention_heads=4, v_intermediate_size=256,
                         bi_hidden_size=256, bi_num_attention_heads=4, bi_intermediate_size=256,
                         v_biattention_id=(0, 1), t_biattention_id=(4, 5))


def _tiny() -> ViLBERTConfig:
    # For unit tests: every width different so that a transposed weight cannot go unnoticed.
    return ViLBERTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=64, v_feature_size=24, v_target_size=11,
                         v_hidden_size=40, v_num_hidden_layers=2, v_num_attention_heads=5, v_intermediate_size=29,
                         bi_hidden_size=48, bi_num_attention_heads=6, bi_intermediate_size=48,
                         v_biattention_id=(0, 1), t_biattention_id=(1, 2))


# Explicit name -> factory table (no registration at import time).
NAMED_CONFIGS: dict[str, Callable[[], ViLBERTConfig]] = {"base": _base, "small": _small, "tiny": _tiny}
