"""Loading the published ViLBERT checkpoints and starting the text stream from a Hugging Face BERT."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vilbert.errors import CheckpointError, ConfigError, MissingDependencyError, SourceNotFoundError
from vilbert.model.configuration_vilbert import LAYER_NORM_EPS, ViLBERTConfig

logger = logging.getLogger(__name__)


_TIED_KEYS = ("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight")


def normalize_key(key: str) -> str:
    """Map a key of an official checkpoint onto ours, as the official `from_pretrained` did.

    Strips DataParallel/DDP `module.` prefixes and renames old LayerNorm names `gamma`/`beta` to
    `weight`/`bias`.
    """
    while key.startswith("module."):
        key = key[len("module."):]
    key = re.sub(r"\.gamma$", ".weight", key)
    return re.sub(r"\.beta$", ".bias", key)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a torch `.bin`/`.pt`/`.pth` file (weights only) or a `.safetensors` file.

    Keys are returned as stored (see `normalize_key`). A dict holding the weights under "state_dict" or
    "model" (training checkpoints) is unwrapped.

    Raises:
        SourceNotFoundError: the file does not exist.
        CheckpointError: the file is not a state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceNotFoundError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        # weights_only: a checkpoint is data; never run pickled code from it.
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of parameter name -> tensor, found {type(obj).__name__}")
    return obj


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Load a published ViLBERT checkpoint (or one of ours) into `model`.

    Works for vilbert-multi-task `pretrained_model.bin` into `ViLBERTForPretraining`, `multi_task_model.bin`
    into `ViLBERTForVLTasks(config with task_specific_tokens=True)`, and vilbert_beta `pytorch_model_9.bin`
    (pretraining) or its task checkpoints into `ViLBERTForVLTasks(head_layout="beta")`.

    Args:
        model: a ViLBERT model whose config matches the checkpoint.
        path: the checkpoint file.
        strict: require exactly the model's keys. With False, keys missing from the file keep their
            current (initial) values and are returned, and keys the model lacks are ignored (logged);
            use it to start task heads from a pretraining checkpoint.

    Returns:
        The model keys the file did not provide (empty when strict).

    Raises:
        CheckpointError: missing or unexpected keys (strict), or a shape mismatch; the message names the
            file and the first offending keys.
    """
    raw = read_state_dict(path)
    state = {normalize_key(k): v for k, v in raw.items()}
    own = model.state_dict()
    # The MLM decoder is tied to the word embeddings; files that store the shared tensor once (safetensors'
    # save_model) are complete all the same.
    for a, b in (_TIED_KEYS, _TIED_KEYS[::-1]):
        if a in own and b in own and a not in state and b in state:
            state[a] = state[b]
    bad_shapes = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad_shapes:
        raise CheckpointError(f"{path}: {len(bad_shapes)} tensor(s) have the wrong shape for this config, e.g. "
                              f"{bad_shapes[:3]}; build the model from the config the checkpoint was trained with")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: does not match {type(model).__name__}: {len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}; check the model class, head_layout and "
            "task_specific_tokens, or pass strict=False to start new heads")
    if unexpected:
        logger.info("%s: ignoring %d key(s) the model does not have, e.g. %s", path, len(unexpected), unexpected[:5])
    if missing:
        logger.info("%s: %d model key(s) not in the file keep their initial values, e.g. %s", path, len(missing),
                    missing[:5])
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing


# --------------------------------------------------------------------------------- Hugging Face BERT
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_LAYER_PARTS = {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                   "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"}


def _read_hf_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise SourceNotFoundError(f"{path}: not a Hugging Face BERT directory (no config.json)")
    return json.loads(cfg_file.read_text(encoding="utf-8"))


def _hf_weights_file(path: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise SourceNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin in this BERT directory")


def config_from_hf_bert(path: str | os.PathLike, base: ViLBERTConfig | None = None, **changes: Any) -> ViLBERTConfig:
    """A ViLBERT config whose text stream has the shape of the BERT in `path`.

    Args:
        path: a Hugging Face BERT directory (config.json + weights), e.g. a bert-base-uncased download.
        base: config supplying the visual and co-attention fields (the base config if None).
        **changes: further field overrides (e.g. t_biattention_id for a BERT with fewer layers).

    Raises:
        ConfigError: the BERT is not a post-LN BERT with absolute positions ViLBERT can use.
    """
    path = Path(path)
    hf = _read_hf_config(path)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"{path}: position_embedding_type {hf['position_embedding_type']!r}; ViLBERT needs absolute")
    if abs(float(hf.get("layer_norm_eps", LAYER_NORM_EPS)) - LAYER_NORM_EPS) > 1e-15:
        raise ConfigError(f"{path}: layer_norm_eps {hf['layer_norm_eps']} differs from ViLBERT's {LAYER_NORM_EPS}")
    text = {k: hf[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                "intermediate_size", "hidden_act", "hidden_dropout_prob",
                                "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
                                "initializer_range") if k in hf}
    base = base or ViLBERTConfig()
    return base.replace(**{**text, **changes})


def init_text_from_hf_bert(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Copy a Hugging Face BERT's weights into the text stream (the official bert-base-uncased start).

    Maps transformers' BERT names (with or without the `bert.` prefix, old `gamma`/`beta` included) onto
    `bert.embeddings.*` and `bert.encoder.layer.N.*`, and, when the file has them (BertForPreTraining
    checkpoints such as bert-base-uncased), `cls.predictions.*` (MLM transform and bias). The BERT pooler
    and next-sentence head are not used (ViLBERT's poolers are 768->1024 ReLU).

    Args:
        model: a ViLBERTForPretraining / ViLBERTForVLTasks (or ViLBERTModel) built from
            `config_from_hf_bert(path)` or a config with the same text shape.
        path: the BERT directory.

    Returns:
        The model keys that were copied.

    Raises:
        CheckpointError: the BERT has a different shape or fewer layers than the text stream.
    """
    path = Path(path)
    weights = read_state_dict(_hf_weights_file(path))
    prefix = "bert." if hasattr(model, "bert") else ""
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for key, value in weights.items():
        k = normalize_key(key)
        if k.startswith("bert."):
            k = k[len("bert."):]
        if k.startswith("cls.predictions."):
            if k.startswith("cls.predictions.decoder"):
                continue  # tied to the word embeddings
            mapped[k] = value  # kept only if the model has the MLM head (filtered below)
            continue
        if k.startswith("embeddings.") and k.split(".")[1] in ("word_embeddings", "position_embeddings",
                                                               "token_type_embeddings", "LayerNorm"):
            mapped[prefix + k] = value
            continue
        m = _HF_LAYER.match(k)
        if m and m.group(2).rsplit(".", 1)[0] in _HF_LAYER_PARTS:
            mapped[prefix + k] = value
    n_layers = 1 + max((int(m.group(1)) for k in weights if (m := _HF_LAYER.match(normalize_key(k).removeprefix("bert.")))),
                       default=-1)
    n_ours = sum(1 for k in own if re.match(rf"^{re.escape(prefix)}encoder\.layer\.\d+\.output\.dense\.weight$", k))
    if n_layers < n_ours:
        raise CheckpointError(f"{path}: BERT has {n_layers} layers but the text stream has {n_ours}; build the model "
                              "with config_from_hf_bert(path) or fewer num_hidden_layers")
    if n_layers > n_ours:
        logger.warning("%s: BERT has %d layers; copying the first %d into the text stream", path, n_layers, n_ours)
    mapped = {k: v for k, v in mapped.items() if k in own}
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items() if v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"{path}: BERT tensors do not fit the text stream, e.g. {bad[:3]}; build the model "
                              "with config_from_hf_bert(path)")
    expected = [k for k in own if re.match(rf"^{re.escape(prefix)}(embeddings\.(word|position|token_type)_embeddings"
                                           rf"|embeddings\.LayerNorm|encoder\.layer\.)", k)]
    absent = [k for k in expected if k not in mapped]
    if absent:
        raise CheckpointError(f"{path}: BERT lacks {len(absent)} text-stream tensor(s), e.g. {absent[:3]}")
    model.load_state_dict(mapped, strict=False)
    logger.info("initialised %d text-stream tensors from %s", len(mapped), path)
    return sorted(mapped)


def load_tokenizer(path: str | os.PathLike):
    """The BERT word-piece tokenizer of a Hugging Face BERT directory (vocabulary and casing from it).

    Raises:
        MissingDependencyError: transformers is not installed (extra `model`).
    """
    try:
        from transformers import BertTokenizerFast
    except ImportError as exc:  # pragma: no cover - transformers is a declared dependency of the extra
        raise MissingDependencyError("transformers is needed for the tokenizer: pip install 'vilbert[model]'") from exc
    # transformers 5 silently ignores BertTokenizer(vocab_file=...); from_pretrained(dir) reads the vocabulary.
    return BertTokenizerFast.from_pretrained(str(path))
