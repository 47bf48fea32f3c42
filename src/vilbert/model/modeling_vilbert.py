"""ViLBERT's two-stream co-attention transformer, its pretraining and task heads, and their losses.

Module and parameter names reproduce the released checkpoints (vilbert-multi-task and vilbert_beta), so
their state dicts load with ``strict=True``. Attention runs through
``torch.nn.functional.scaled_dot_product_attention``; the math is the official one.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vilbert.errors import ConfigError
from vilbert.model.configuration_vilbert import LAYER_NORM_EPS, NUM_LOCATIONS, NUM_TASK_TOKENS, ViLBERTConfig

logger = logging.getLogger(__name__)

# The official code masks with an additive -10000 (not -inf): a row whose keys are all masked then still
# gives a finite, uniform softmax instead of NaN. We keep the constant so outputs match.
MASK_VALUE = -10000.0

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
                "gelu_new": lambda: nn.GELU(approximate="tanh"), "tanh": nn.Tanh}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; valid ones are {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def extend_attention_mask(mask: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """Turn a (B, N) 1/0 mask into the additive (B, 1, 1, N) mask of the official code.

    Args:
        mask: (B, N) with 1 for real positions and 0 for padding (any dtype), or None for no padding.
        dtype: dtype of the result.

    Returns:
        (B, 1, 1, N) tensor of 0 (keep) and -10000 (drop), or None.
    """
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


def _attend(q: Tensor, k: Tensor, v: Tensor, num_heads: int, mask: Tensor | None, dropout_p: float) -> Tensor:
    """Multi-head scaled dot-product attention on (B, Lq, W) / (B, Lk, W) projections -> (B, Lq, W)."""
    b, lq, w = q.shape
    lk = k.shape[1]
    d = w // num_heads
    q = q.view(b, lq, num_heads, d).transpose(1, 2)  # (B, H, Lq, D)
    k = k.view(b, lk, num_heads, d).transpose(1, 2)  # (B, H, Lk, D)
    v = v.view(b, lk, num_heads, d).transpose(1, 2)
    if mask is not None:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, Lq, D)
    return out.transpose(1, 2).reshape(b, lq, w)


def _project(x: Tensor, *linears: nn.Linear) -> tuple[Tensor, ...]:
    """Apply several Linear layers that share input `x` as one matmul (same math, fewer kernels)."""
    weight = torch.cat([lin.weight for lin in linears])
    bias = torch.cat([lin.bias for lin in linears])
    return F.linear(x, weight, bias).split([lin.out_features for lin in linears], dim=-1)


# ----------------------------------------------------------------------------------------- embeddings
class BertEmbeddings(nn.Module):
    """Word + position + segment embeddings, optional task token after [CLS], LayerNorm, dropout."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        if config.task_specific_tokens:
            self.task_embeddings = nn.Embedding(NUM_TASK_TOKENS, config.hidden_size)
        # `LayerNorm` keeps the checkpoint's (TensorFlow-derived) name so released weights load.
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None, task_ids: Tensor | None = None) -> Tensor:
        """Embed tokens.

        Args:
            input_ids: (B, L) int64 word-piece ids.
            token_type_ids: (B, L) int64 segment ids, zeros if None.
            task_ids: (B,) or (B, 1) int64 task ids, inserted as a token at position 1 (MT only).

        Returns:
            (B, L, hidden_size), or (B, L + 1, hidden_size) with a task token.
        """
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        emb = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] \
            + self.token_type_embeddings(token_type_ids)  # (B, L, H)
        if task_ids is not None:
            if not hasattr(self, "task_embeddings"):
                raise ConfigError("task_ids given but the config has task_specific_tokens=False")
            task = self.task_embeddings(task_ids.reshape(-1, 1))  # (B, 1, H), no position/type embedding
            emb = torch.cat([emb[:, :1], task, emb[:, 1:]], dim=1)
        return self.dropout(self.LayerNorm(emb))


class BertImageEmbeddings(nn.Module):
    """Region embedding: LayerNorm(Linear(feature) + Linear(5-d location)), dropout."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.image_embeddings = nn.Linear(config.v_feature_size, config.v_hidden_size)
        self.image_location_embeddings = nn.Linear(NUM_LOCATIONS, config.v_hidden_size)
        self.LayerNorm = nn.LayerNorm(config.v_hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.v_hidden_dropout_prob)

    def forward(self, image_feat: Tensor, image_loc: Tensor) -> Tensor:
        """(B, R, v_feature_size) features and (B, R, 5) locations -> (B, R, v_hidden_size)."""
        return self.dropout(self.LayerNorm(self.image_embeddings(image_feat) + self.image_location_embeddings(image_loc)))


# ----------------------------------------------------------------------------------------- one stream
class BertSelfAttention(nn.Module):
    """Multi-head self-attention projections (keys `query`, `key`, `value`)."""

    def __init__(self, width: int, num_heads: int, dropout_p: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout_p = dropout_p
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """(B, N, W) and additive (B, 1, 1, N) mask -> context (B, N, W)."""
        p = self.dropout_p if self.training else 0.0
        q, k, v = _project(x, self.query, self.key, self.value)
        return _attend(q, k, v, self.num_heads, mask, p)


class BertResidualOutput(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual): BERT's `attention.output` and `output` blocks."""

    def __init__(self, in_width: int, out_width: int, dropout_p: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, out_width)
        self.LayerNorm = nn.LayerNorm(out_width, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    """Self-attention plus its output projection and residual LayerNorm."""

    def __init__(self, width: int, num_heads: int, attn_dropout: float, hidden_dropout: float) -> None:
        super().__init__()
        self.self = BertSelfAttention(width, num_heads, attn_dropout)
        self.output = BertResidualOutput(width, width, hidden_dropout)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    """First FFN half: act(dense(x))."""

    def __init__(self, width: int, inner: int, act: str) -> None:
        super().__init__()
        self.dense = nn.Linear(width, inner)
        self.act = _activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """Post-LN transformer layer; text (`BertLayer`) and visual (`BertImageLayer`) layers share it."""

    def __init__(self, width: int, num_heads: int, inner: int, act: str, attn_dropout: float,
                 hidden_dropout: float) -> None:
        super().__init__()
        self.attention = BertAttention(width, num_heads, attn_dropout, hidden_dropout)
        self.intermediate = BertIntermediate(width, inner, act)
        self.output = BertResidualOutput(inner, width, hidden_dropout)

    @classmethod
    def text(cls, c: ViLBERTConfig) -> "BertLayer":
        return cls(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_act,
                   c.attention_probs_dropout_prob, c.hidden_dropout_prob)

    @classmethod
    def visual(cls, c: ViLBERTConfig) -> "BertLayer":
        return cls(c.v_hidden_size, c.v_num_attention_heads, c.v_intermediate_size, c.v_hidden_act,
                   c.v_attention_probs_dropout_prob, c.v_hidden_dropout_prob)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """(B, N, W) and additive (B, 1, 1, N) mask -> (B, N, W)."""
        h = self.attention(x, mask)
        return self.output(self.intermediate(h), h)


# ----------------------------------------------------------------------------------------- co-attention
class BertBiAttention(nn.Module):
    """Cross-attention both ways: text queries attend to regions, region queries attend to text."""

    def __init__(self, c: ViLBERTConfig) -> None:
        super().__init__()
        self.num_heads = c.bi_num_attention_heads
        self.v_dropout_p = c.v_attention_probs_dropout_prob  # official `dropout1`, on text->image probs
        self.t_dropout_p = c.attention_probs_dropout_prob  # official `dropout2`, on image->text probs
        self.query1 = nn.Linear(c.v_hidden_size, c.bi_hidden_size)
        self.key1 = nn.Linear(c.v_hidden_size, c.bi_hidden_size)
        self.value1 = nn.Linear(c.v_hidden_size, c.bi_hidden_size)
        self.query2 = nn.Linear(c.hidden_size, c.bi_hidden_size)
        self.key2 = nn.Linear(c.hidden_size, c.bi_hidden_size)
        self.value2 = nn.Linear(c.hidden_size, c.bi_hidden_size)

    def forward(self, v: Tensor, v_mask: Tensor | None, t: Tensor, t_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Cross-attend.

        Args:
            v: (B, R, v_hidden_size) regions. v_mask: additive (B, 1, 1, R).
            t: (B, L, hidden_size) tokens. t_mask: additive (B, 1, 1, L).

        Returns:
            ctx_t (B, L, bi_hidden_size): text attending to regions; ctx_v (B, R, bi_hidden_size).
        """
        train = self.training
        q1, k1, v1 = _project(v, self.query1, self.key1, self.value1)  # (B, R, bi_hidden_size) each
        q2, k2, v2 = _project(t, self.query2, self.key2, self.value2)  # (B, L, bi_hidden_size) each
        ctx_t = _attend(q2, k1, v1, self.num_heads, v_mask, self.v_dropout_p if train else 0.0)
        ctx_v = _attend(q1, k2, v2, self.num_heads, t_mask, self.t_dropout_p if train else 0.0)
        return ctx_t, ctx_v


class BertBiOutput(nn.Module):
    """Cross-attention output projections with residual LayerNorms (and the official dead `q_dense*`)."""

    def __init__(self, c: ViLBERTConfig) -> None:
        super().__init__()
        self.dense1 = nn.Linear(c.bi_hidden_size, c.v_hidden_size)
        self.LayerNorm1 = nn.LayerNorm(c.v_hidden_size, eps=LAYER_NORM_EPS)
        self.dropout1 = nn.Dropout(c.v_hidden_dropout_prob)
        # q_dense1 / q_dense2 exist in every released state dict but the official forward never uses them.
        self.q_dense1 = nn.Linear(c.bi_hidden_size, c.v_hidden_size)
        self.dense2 = nn.Linear(c.bi_hidden_size, c.hidden_size)
        self.LayerNorm2 = nn.LayerNorm(c.hidden_size, eps=LAYER_NORM_EPS)
        self.dropout2 = nn.Dropout(c.hidden_dropout_prob)
        self.q_dense2 = nn.Linear(c.bi_hidden_size, c.hidden_size)
        # Never used, so never given a gradient (as in official training); frozen so that DDP needs no
        # find_unused_parameters and optimizers skip them.
        self.q_dense1.requires_grad_(False)
        self.q_dense2.requires_grad_(False)

    def forward(self, ctx_v: Tensor, v: Tensor, ctx_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Return V' (B, R, v_hidden_size) and T' (B, L, hidden_size)."""
        return (self.LayerNorm1(self.dropout1(self.dense1(ctx_v)) + v),
                self.LayerNorm2(self.dropout2(self.dense2(ctx_t)) + t))


class BertConnectionLayer(nn.Module):
    """One Co-TRM block: cross-attention both ways, then a feed-forward per stream (no self-attention)."""

    def __init__(self, c: ViLBERTConfig) -> None:
        super().__init__()
        self.biattention = BertBiAttention(c)
        self.biOutput = BertBiOutput(c)
        self.v_intermediate = BertIntermediate(c.v_hidden_size, c.v_intermediate_size, c.v_hidden_act)
        self.v_output = BertResidualOutput(c.v_intermediate_size, c.v_hidden_size, c.v_hidden_dropout_prob)
        self.t_intermediate = BertIntermediate(c.hidden_size, c.intermediate_size, c.hidden_act)
        self.t_output = BertResidualOutput(c.intermediate_size, c.hidden_size, c.hidden_dropout_prob)

    def forward(self, v: Tensor, v_mask: Tensor | None, t: Tensor, t_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """(B, R, Wv), (B, L, Wt) -> the same shapes, after cross-attention and the two FFNs."""
        ctx_t, ctx_v = self.biattention(v, v_mask, t, t_mask)
        v, t = self.biOutput(ctx_v, v, ctx_t, t)
        v = self.v_output(self.v_intermediate(v), v)
        t = self.t_output(self.t_intermediate(t), t)
        return v, t


class BertEncoder(nn.Module):
    """Text layers, visual layers and co-attention layers, run in the official schedule.

    For each pair (v_id, t_id) of (v_biattention_id, t_biattention_id): text layers up to t_id - 1, visual
    layers up to v_id - 1, then the next co-layer; finally the remaining layers of both streams.
    """

    def __init__(self, c: ViLBERTConfig) -> None:
        super().__init__()
        for flag, ok in (("with_coattention", True), ("dynamic_attention", False), ("in_batch_pairs", False),
                         ("model", "bert")):
            if getattr(c, flag) != ok:
                raise ConfigError(f"ViLBERTConfig.{flag}={getattr(c, flag)} is not supported (no released "
                                  f"model uses it); set {flag}={ok}")
        self.config = c
        self.layer = nn.ModuleList(BertLayer.text(c) for _ in range(c.num_hidden_layers))
        self.v_layer = nn.ModuleList(BertLayer.visual(c) for _ in range(c.v_num_hidden_layers))
        self.c_layer = nn.ModuleList(BertConnectionLayer(c) for _ in range(c.num_co_layers))

    @property
    def num_text_prefix_layers(self) -> int:
        """Text layers that run before the first co-attention layer (independent of the image)."""
        return self.config.t_biattention_id[0] if self.config.num_co_layers else self.config.num_hidden_layers

    def _text_layers(self, t: Tensor, t_mask: Tensor | None, start: int, end: int) -> Tensor:
        for i in range(start, end):
            frozen = i < self.config.fixed_t_layer
            with torch.no_grad() if frozen else contextlib.nullcontext():
                t = self.layer[i](t, t_mask)
        return t

    def forward_text_prefix(self, t: Tensor, t_mask: Tensor | None) -> Tensor:
        """Run the text-only layers that precede the first co-attention layer: (B, L, H) -> (B, L, H)."""
        return self._text_layers(t, t_mask, 0, self.num_text_prefix_layers)

    def forward(self, t: Tensor, v: Tensor, t_mask: Tensor | None, v_mask: Tensor | None,
                text_prefix_done: bool = False) -> tuple[Tensor, Tensor]:
        """Run both streams.

        Args:
            t: (B, L, hidden_size) text embeddings (or prefix outputs when `text_prefix_done`).
            v: (B, R, v_hidden_size) region embeddings.
            t_mask, v_mask: additive (B, 1, 1, L) / (B, 1, 1, R) masks or None.
            text_prefix_done: `t` already went through `forward_text_prefix`.

        Returns:
            Final text (B, L, hidden_size) and visual (B, R, v_hidden_size) states.
        """
        t_start = self.num_text_prefix_layers if text_prefix_done else 0
        v_start = 0
        for co, (v_id, t_id) in enumerate(zip(self.config.v_biattention_id, self.config.t_biattention_id)):
            t = self._text_layers(t, t_mask, t_start, t_id)
            for j in range(v_start, v_id):
                v = self.v_layer[j](v, v_mask)
            t_start, v_start = t_id, v_id
            v, t = self.c_layer[co](v, v_mask, t, t_mask)
        for j in range(v_start, len(self.v_layer)):
            v = self.v_layer[j](v, v_mask)
        t = self._text_layers(t, t_mask, t_start, len(self.layer))
        return t, v


class BertPooler(nn.Module):
    """ReLU(Linear(first token)): `t_pooler` on [CLS], `v_pooler` on [IMG] (ReLU, not BERT's tanh)."""

    def __init__(self, in_width: int, out_width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, out_width)
        self.activation = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, in_width) -> (B, out_width)."""
        return self.activation(self.dense(x[:, 0]))


# ----------------------------------------------------------------------------------------- the model
@dataclass
class ViLBERTModelOutput:
    """Outputs of `ViLBERTModel`.

    Attributes:
        sequence_output_t: (B, L, hidden_size) final text states (L + 1 with a task token).
        sequence_output_v: (B, R, v_hidden_size) final region states ([IMG] at row 0).
        pooled_output_t: (B, bi_hidden_size) pooled [CLS].
        pooled_output_v: (B, bi_hidden_size) pooled [IMG].
        attention_mask: (B, L) text mask actually used (with the task token's 1 inserted).
    """

    sequence_output_t: Tensor
    sequence_output_v: Tensor
    pooled_output_t: Tensor
    pooled_output_v: Tensor
    attention_mask: Tensor | None


class ViLBERTPreTrainedModel(nn.Module):
    """Weight initialisation shared by all ViLBERT models (official `init_bert_weights`)."""

    config: ViLBERTConfig

    def init_weights(self, skip: tuple[str, ...] = ()) -> None:
        """N(0, initializer_range) for Linear/Embedding weights, 0 for biases, LayerNorm 1/0.

        Args:
            skip: names of direct children already initialised (e.g. "bert").
        """
        std = self.config.initializer_range
        skipped = {id(m) for name in skip for m in getattr(self, name).modules()}
        for m in self.modules():
            if id(m) in skipped:
                continue
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WeightNormLinear):
                m.reset_parameters(std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


class ViLBERTModel(ViLBERTPreTrainedModel):
    """The two-stream encoder with poolers (official `BertModel`)."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.v_embeddings = BertImageEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.t_pooler = BertPooler(config.hidden_size, config.bi_hidden_size)
        self.v_pooler = BertPooler(config.v_hidden_size, config.bi_hidden_size)
        self.init_weights()
        if config.fixed_t_layer:
            # Text layers [0, fixed_t_layer) run under no_grad (official --freeze), so they and the text
            # embeddings under them never get a gradient; mark them so optimizers and DDP skip them. The word
            # embeddings stay trainable: the MLM decoder is tied to them.
            for i in range(config.fixed_t_layer):
                self.encoder.layer[i].requires_grad_(False)
            for name, module in self.embeddings.named_children():
                if name != "word_embeddings":
                    module.requires_grad_(False)

    def _text_mask(self, input_ids: Tensor, attention_mask: Tensor | None, task_ids: Tensor | None) -> Tensor:
        if self.config.task_specific_tokens and task_ids is None:
            raise ConfigError("this model was built with task_specific_tokens=True (as multi_task_model.bin): "
                              "pass task_ids (the n of TASKn, e.g. 1 for VQA)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if task_ids is not None:
            attention_mask = torch.cat([attention_mask[:, :1], torch.ones_like(attention_mask[:, :1]),
                                        attention_mask[:, 1:]], dim=1)
        return attention_mask

    def encode_text_prefix(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                           attention_mask: Tensor | None = None, task_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Embed the text and run the layers before the first co-attention layer (official `fast_mode`).

        The result depends on the text only; expand it over candidate images with `repeat_interleave` and
        pass it to `forward(text_prefix=...)` to score many images per caption.

        Args:
            input_ids, token_type_ids, attention_mask: (B, L) as in `forward`.
            task_ids: (B,) task ids when the config has task tokens.

        Returns:
            Hidden states (B, L', hidden_size) and the text mask (B, L') that goes with them.
        """
        mask = self._text_mask(input_ids, attention_mask, task_ids)
        t = self.embeddings(input_ids, token_type_ids, task_ids)
        return self.encoder.forward_text_prefix(t, extend_attention_mask(mask, t.dtype)), mask

    def forward(self, input_ids: Tensor | None, image_feat: Tensor, image_loc: Tensor,
                token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                image_attention_mask: Tensor | None = None, task_ids: Tensor | None = None,
                text_prefix: tuple[Tensor, Tensor] | None = None) -> ViLBERTModelOutput:
        """Encode a batch of (text, image) pairs.

        Args:
            input_ids: (B, L) int64 token ids ([CLS] first); may be None when `text_prefix` is given.
            image_feat: (B, R, v_feature_size) float region features, [IMG] feature at row 0.
            image_loc: (B, R, 5) float normalised boxes [x1, y1, x2, y2, area], [0, 0, 1, 1, 1] for [IMG].
            token_type_ids: (B, L) int64 segment ids (zeros if None).
            attention_mask: (B, L) 1 for tokens, 0 for padding (ones if None).
            image_attention_mask: (B, R) 1 for regions, 0 for padding (ones if None).
            task_ids: (B,) or (B, 1) int64 task ids (configs with task_specific_tokens).
            text_prefix: output of `encode_text_prefix` (already expanded to B rows) to skip the text prefix.

        Returns:
            ViLBERTModelOutput.
        """
        if text_prefix is not None:
            t, mask = text_prefix
            prefix_done = True
        else:
            mask = self._text_mask(input_ids, attention_mask, task_ids)
            t = self.embeddings(input_ids, token_type_ids, task_ids)
            prefix_done = False
        v = self.v_embeddings(image_feat, image_loc)
        t_mask = extend_attention_mask(mask, t.dtype)
        v_mask = extend_attention_mask(image_attention_mask, v.dtype)
        t, v = self.encoder(t, v, t_mask, v_mask, text_prefix_done=prefix_done)
        return ViLBERTModelOutput(t, v, self.t_pooler(t), self.v_pooler(v), mask)


def fuse(pooled_t: Tensor, pooled_v: Tensor, method: str) -> Tensor:
    """Fuse pooled [CLS] and [IMG] (B, bi_hidden_size): element-wise product ("mul") or sum ("sum")."""
    return pooled_t * pooled_v if method == "mul" else pooled_t + pooled_v


# ----------------------------------------------------------------------------------------- heads
class BertPredictionHeadTransform(nn.Module):
    """dense -> activation -> LayerNorm."""

    def __init__(self, width: int, act: str) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.transform_act_fn = _activation(act)
        self.LayerNorm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    """MLM head; the decoder weight is tied to the word embeddings but saved under its own key."""

    def __init__(self, config: ViLBERTConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config.hidden_size, config.hidden_act)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        """(..., hidden_size) -> (..., vocab_size) logits."""
        return F.linear(self.transform(x), self.decoder.weight, self.bias)


class BertImagePredictionHead(nn.Module):
    """Region-class (or region-feature) head: transform then Linear(v_hidden_size -> v_target_size)."""

    def __init__(self, config: ViLBERTConfig) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config.v_hidden_size, config.v_hidden_act)
        self.decoder = nn.Linear(config.v_hidden_size, config.v_target_size)

    def forward(self, x: Tensor) -> Tensor:
        """(..., v_hidden_size) -> (..., v_target_size)."""
        return self.decoder(self.transform(x))


class BertPreTrainingHeads(nn.Module):
    """The official `cls` module: MLM, alignment and masked-region heads."""

    def __init__(self, config: ViLBERTConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, word_embeddings)
        self.bi_seq_relationship = nn.Linear(config.bi_hidden_size, 2)
        self.imagePredictions = BertImagePredictionHead(config)
        self.fusion_method = config.fusion_method
        self.dropout = nn.Dropout(0.1)  # official hard-codes 0.1 here

    def alignment(self, pooled_t: Tensor, pooled_v: Tensor) -> Tensor:
        """(B, bi_hidden_size) x 2 -> (B, 2) alignment logits (index 0 = aligned)."""
        return self.bi_seq_relationship(self.dropout(fuse(pooled_t, pooled_v, self.fusion_method)))


# ----------------------------------------------------------------------------------------- losses
def masked_lm_loss(scores: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over labelled tokens (label -1 = ignored), averaged over them.

    Args:
        scores: (..., V) logits.
        labels: (...) int64 token ids or -1.

    Returns:
        Scalar float32 loss; 0 (not NaN) when nothing is labelled.
    """
    scores = scores.reshape(-1, scores.shape[-1]).float()
    labels = labels.reshape(-1)
    total = F.cross_entropy(scores, labels, ignore_index=-1, reduction="sum")
    return total / (labels != -1).sum().clamp(min=1)


def masked_region_kl_loss(log_probs: Tensor, target: Tensor, selected: Tensor | None = None) -> Tensor:
    """KL(target || prediction) summed over classes and selected regions, divided by max(#selected, 1).

    Args:
        log_probs: (..., C) log-softmax of the region logits.
        target: (..., C) detector class distribution (rows may be all zero for padding).
        selected: (...) bool, the regions to score; all if None.

    Returns:
        Scalar float32 loss (the official code divides by max(n, 0) and returns NaN for n = 0).
    """
    kl = F.kl_div(log_probs.float(), target.float(), reduction="none").sum(-1)  # (...)
    if selected is None:
        return kl.sum() / max(kl.numel(), 1)
    return (kl * selected).sum() / selected.sum().clamp(min=1)


def masked_region_mse_loss(pred: Tensor, target: Tensor, selected: Tensor | None = None) -> Tensor:
    """visual_target 1: squared error to the region feature, averaged over selected elements."""
    se = (pred.float() - target.float()).pow(2)  # (..., D)
    if selected is None:
        return se.mean()
    sel = selected[..., None].to(se.dtype)
    return (se * sel).sum() / (sel.sum() * se.shape[-1]).clamp(min=1)


def alignment_loss(seq_relationship_score: Tensor, next_sentence_label: Tensor) -> Tensor:
    """Cross-entropy of (B, 2) alignment logits against is_next (0 aligned, 1 not, -1 ignored)."""
    return masked_lm_loss(seq_relationship_score, next_sentence_label)


def vqa_loss(logits: Tensor, soft_scores: Tensor) -> Tensor:
    """Official VQA loss: BCE-with-logits (mean) x num_labels, against (B, num_labels) soft scores."""
    return F.binary_cross_entropy_with_logits(logits.float(), soft_scores.float()) * soft_scores.shape[1]


def multiple_choice_loss(vil_logit: Tensor, labels: Tensor, num_options: int) -> Tensor:
    """Cross-entropy over options: (B * num_options, 1) logits grouped per question; labels (B,).

    Used for VCR (4 answers), visual dialog and the 4-way retrieval training (positive at index 0).
    """
    return F.cross_entropy(vil_logit.float().reshape(-1, num_options), labels.reshape(-1))


def retrieval_loss(vil_logit: Tensor, num_options: int = 4) -> Tensor:
    """Official retrieval training loss: 4-way cross-entropy, the aligned pair first in each group."""
    labels = torch.zeros(vil_logit.numel() // num_options, dtype=torch.long, device=vil_logit.device)
    return multiple_choice_loss(vil_logit, labels, num_options)


def grounding_loss(vision_logit: Tensor, iou_target: Tensor, image_attention_mask: Tensor) -> Tensor:
    """Referring-expression loss: BCE against IoU targets, padded regions masked, summed per sample.

    Equals the official `BCEWithLogits(none).mean() * R`, where padded regions contribute ~0 through the
    -10000 logit offset; here they are masked out explicitly.

    Args:
        vision_logit: (B, R, 1) or (B, R) region logits.
        iou_target: (B, R) targets (IoU, zeroed below 0.5 by the dataset).
        image_attention_mask: (B, R) 1 for real regions.
    """
    logit = vision_logit.float().reshape(iou_target.shape)
    bce = F.binary_cross_entropy_with_logits(logit, iou_target.float(), reduction="none")
    return (bce * image_attention_mask.to(bce.dtype)).sum() / iou_target.shape[0]


# ----------------------------------------------------------------------------------------- pretraining
@dataclass
class ViLBERTPretrainingOutput:
    """Outputs of `ViLBERTForPretraining`.

    Without labels the scores are dense: prediction_scores_t (B, L, vocab), prediction_scores_v
    (B, R, v_target_size) including the [IMG] row, seq_relationship_score (B, 2). With labels (and
    `sparse_heads`), prediction_scores_t holds only the labelled tokens (N_t, vocab) and
    prediction_scores_v only the selected regions (N_v, v_target_size), in row-major order.
    Losses are float32 scalars; `loss` = masked_lm_loss + masked_img_loss + next_sentence_loss.
    """

    prediction_scores_t: Tensor
    prediction_scores_v: Tensor
    seq_relationship_score: Tensor
    masked_lm_loss: Tensor | None = None
    masked_img_loss: Tensor | None = None
    next_sentence_loss: Tensor | None = None
    loss: Tensor | None = None


class ViLBERTForPretraining(ViLBERTPreTrainedModel):
    """ViLBERT with the pretraining heads (official `BertForMultiModalPreTraining`).

    Args:
        config: the model config.
        sparse_heads: with labels, run the MLM and region heads only at labelled positions (same losses,
            far less work: the MLM decoder is the largest matmul of a step).
    """

    def __init__(self, config: ViLBERTConfig, sparse_heads: bool = True) -> None:
        super().__init__()
        if config.visual_target == 2:
            raise ConfigError("ViLBERTConfig.visual_target=2 (NCE regions) is not supported; use 0 (KL) or 1 (MSE)")
        self.config = config
        self.sparse_heads = sparse_heads
        self.bert = ViLBERTModel(config)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        self.init_weights(skip=("bert",))
        if config.objective == 2:
            # No alignment loss: the poolers and the alignment head get no gradient (mark them for DDP).
            for module in (self.bert.t_pooler, self.bert.v_pooler, self.cls.bi_seq_relationship):
                module.requires_grad_(False)

    def forward(self, input_ids: Tensor, image_feat: Tensor, image_loc: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, image_attention_mask: Tensor | None = None,
                masked_lm_labels: Tensor | None = None, image_label: Tensor | None = None,
                image_target: Tensor | None = None, next_sentence_label: Tensor | None = None,
                task_ids: Tensor | None = None) -> ViLBERTPretrainingOutput:
        """Run the model and, when labels are given, the three pretraining losses.

        Args:
            input_ids, image_feat, image_loc, token_type_ids, attention_mask, image_attention_mask, task_ids:
                as in `ViLBERTModel.forward` (R regions including [IMG] at row 0).
            masked_lm_labels: (B, L) int64 original ids at masked tokens, -1 elsewhere.
            image_label: (B, R - 1) int64, 1 at masked regions, -1 elsewhere ([IMG] excluded).
            image_target: (B, R - 1, v_target_size) float class distribution (visual_target 0) or
                (B, R - 1, v_feature_size) features (visual_target 1).
            next_sentence_label: (B,) int64, 0 aligned, 1 not aligned, -1 ignored.

        Returns:
            ViLBERTPretrainingOutput; losses are set when all of masked_lm_labels, image_label,
            image_target and next_sentence_label are given (next_sentence_label may be None when
            objective == 2).
        """
        out = self.bert(input_ids, image_feat, image_loc, token_type_ids, attention_mask, image_attention_mask,
                        task_ids)
        seq_score = self.cls.alignment(out.pooled_output_t, out.pooled_output_v)
        has_labels = masked_lm_labels is not None and image_label is not None and image_target is not None and (
            next_sentence_label is not None or self.config.objective == 2)
        if not has_labels:
            return ViLBERTPretrainingOutput(self.cls.predictions(out.sequence_output_t),
                                            self.cls.imagePredictions(out.sequence_output_v), seq_score)

        if self.config.objective == 1 and next_sentence_label is not None:
            # Masked losses only on aligned pairs (the official dataset sets these labels to -1).
            misaligned = (next_sentence_label.reshape(-1) == 1)
            masked_lm_labels = masked_lm_labels.masked_fill(misaligned[:, None], -1)
            image_label = image_label.masked_fill(misaligned[:, None], -1)
        h_t = out.sequence_output_t
        if h_t.shape[1] != masked_lm_labels.shape[1]:  # task token inserted at position 1: never labelled
            masked_lm_labels = torch.cat([masked_lm_labels[:, :1], torch.full_like(masked_lm_labels[:, :1], -1),
                                          masked_lm_labels[:, 1:]], dim=1)
        h_v = out.sequence_output_v[:, 1:]  # drop [IMG]: (B, R - 1, Wv)
        selected = image_label == 1  # (B, R - 1)
        if self.sparse_heads:
            keep_t = masked_lm_labels != -1
            scores_t = self.cls.predictions(h_t[keep_t])  # (N_t, V)
            lm_loss = masked_lm_loss(scores_t, masked_lm_labels[keep_t])
            scores_v = self.cls.imagePredictions(h_v[selected])  # (N_v, T)
            target, sel = image_target[selected], None
        else:
            scores_t = self.cls.predictions(h_t)
            lm_loss = masked_lm_loss(scores_t, masked_lm_labels)
            scores_v = self.cls.imagePredictions(h_v)
            target, sel = image_target, selected
        if self.config.visual_target == 0:
            img_loss = masked_region_kl_loss(F.log_softmax(scores_v.float(), dim=-1), target, sel)
        else:
            img_loss = masked_region_mse_loss(scores_v, target, sel)
        if self.sparse_heads and scores_v.shape[0] == 0:
            img_loss = img_loss + 0.0 * scores_v.sum()  # keep the graph connected when nothing is masked
        if self.config.objective == 2 or next_sentence_label is None:
            nsp_loss = torch.zeros((), device=seq_score.device)
        else:
            nsp_loss = alignment_loss(seq_score, next_sentence_label)
        return ViLBERTPretrainingOutput(scores_t, scores_v, seq_score, lm_loss, img_loss, nsp_loss,
                                        lm_loss + img_loss + nsp_loss)


# ----------------------------------------------------------------------------------------- tasks
class SimpleClassifier(nn.Module):
    """MT task MLP `logit_fc`: Linear -> GELU -> LayerNorm -> Linear (keys logit_fc.{0,2,3})."""

    def __init__(self, in_dim: int, hid_dim: int, out_dim: int) -> None:
        super().__init__()
        self.logit_fc = nn.Sequential(nn.Linear(in_dim, hid_dim), nn.GELU(), nn.LayerNorm(hid_dim, eps=LAYER_NORM_EPS),
                                      nn.Linear(hid_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.logit_fc(x)


class WeightNormLinear(nn.Module):
    """Linear layer with whole-matrix weight norm (weight = g * v / ||v||), keys weight_g, weight_v, bias.

    Same parameters and math as ``torch.nn.utils.weight_norm(nn.Linear(...), dim=None)`` of the beta code.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(()))  # scalar (dim=None)
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight_v, std=std)
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.norm())
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight_g * self.weight_v / self.weight_v.norm(), self.bias)


class BetaSimpleClassifier(nn.Module):
    """beta `vil_prediction`: weight-normed Linear -> ReLU -> Dropout(0.5) -> weight-normed Linear (`main`)."""

    def __init__(self, in_dim: int, hid_dim: int, out_dim: int, dropout_p: float = 0.5) -> None:
        super().__init__()
        self.main = nn.Sequential(WeightNormLinear(in_dim, hid_dim), nn.ReLU(), nn.Dropout(dropout_p),
                                  WeightNormLinear(hid_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


@dataclass
class ViLBERTVLTasksOutput:
    """Outputs of `ViLBERTForVLTasks` (None where the head layout lacks the head).

    Attributes:
        vil_prediction: (B, num_labels) VQA logits.
        vil_prediction_gqa: (B, 1533) GQA logits (multi-task layout).
        vil_logit: (B, 1) pair score (retrieval, VCR, dialog).
        vil_binary_prediction: (B / 2, 2) NLVR2 logits on concatenated pairs (None for odd B).
        vil_tri_prediction: (B, 3) entailment logits (multi-task layout).
        vision_logit: (B, R, 1) region scores, -10000 at padded regions (grounding).
        linguisic_logit: (B, L, 1) token scores, -10000 at padded tokens.
        pooled_output: (B, bi_hidden_size) fused, after dropout.
        sequence_output_t, sequence_output_v: final states of the two streams.
        attention_mask: (B, L) text mask used (with a task token's 1 inserted).
    """

    vil_prediction: Tensor
    vil_prediction_gqa: Tensor | None
    vil_logit: Tensor
    vil_binary_prediction: Tensor | None
    vil_tri_prediction: Tensor | None
    vision_logit: Tensor
    linguisic_logit: Tensor
    pooled_output: Tensor
    sequence_output_t: Tensor
    sequence_output_v: Tensor
    attention_mask: Tensor | None


HEAD_LAYOUTS = ("multi_task", "beta")
GQA_NUM_LABELS = 1533


class ViLBERTForVLTasks(ViLBERTPreTrainedModel):
    """ViLBERT with the downstream heads (official `VILBertForVLTasks`).

    Args:
        config: the model config (task_specific_tokens=True for multi_task_model.bin).
        num_labels: VQA answer count (3129 for VQA v2 in MT; beta takes it from the dataset).
        head_layout: "multi_task" (vilbert-multi-task heads: vil_prediction, _gqa, binary, tri, logits)
            or "beta" (vilbert_beta: weight-normed vil_prediction, vil_logit, vision_logit, linguisic_logit).
    """

    def __init__(self, config: ViLBERTConfig, num_labels: int = 3129, head_layout: str = "multi_task") -> None:
        super().__init__()
        if head_layout not in HEAD_LAYOUTS:
            raise ConfigError(f"unknown head_layout {head_layout!r}; valid ones are {list(HEAD_LAYOUTS)}")
        self.config = config
        self.head_layout = head_layout
        self.num_labels = num_labels
        self.bert = ViLBERTModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.cls = BertPreTrainingHeads(config, self.bert.embeddings.word_embeddings)
        bi = config.bi_hidden_size
        if head_layout == "multi_task":
            self.vil_prediction = SimpleClassifier(bi, bi * 2, num_labels)
            self.vil_prediction_gqa = SimpleClassifier(bi, bi * 2, GQA_NUM_LABELS)
            self.vil_binary_prediction = SimpleClassifier(bi * 2, bi * 2, 2)
            self.vil_logit = nn.Linear(bi, 1)
            self.vil_tri_prediction = nn.Linear(bi, 3)
        else:
            self.vil_prediction = BetaSimpleClassifier(bi, bi * 2, num_labels)
            self.vil_logit = nn.Linear(bi, 1)
        self.vision_logit = nn.Linear(config.v_hidden_size, 1)
        self.linguisic_logit = nn.Linear(config.hidden_size, 1)  # official spelling, part of the key
        self.init_weights(skip=("bert",))
        # The pretraining heads only exist so checkpoints load; the task forward never uses them. Freeze
        # them (the tied decoder weight is the word embedding and stays trainable) for DDP and optimizers.
        for name, param in self.cls.named_parameters():
            if name != "predictions.decoder.weight":
                param.requires_grad_(False)

    def forward(self, input_ids: Tensor | None, image_feat: Tensor, image_loc: Tensor,
                token_type_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                image_attention_mask: Tensor | None = None, task_ids: Tensor | None = None,
                text_prefix: tuple[Tensor, Tensor] | None = None) -> ViLBERTVLTasksOutput:
        """Run the model and every task head (they are cheap next to the encoder).

        Args: as in `ViLBERTModel.forward`.

        Returns:
            ViLBERTVLTasksOutput.
        """
        out = self.bert(input_ids, image_feat, image_loc, token_type_ids, attention_mask, image_attention_mask,
                        task_ids, text_prefix)
        pooled = self.dropout(fuse(out.pooled_output_t, out.pooled_output_v, self.config.fusion_method))
        vil_prediction = self.vil_prediction(pooled)
        vil_logit = self.vil_logit(pooled)
        gqa = binary = tri = None
        if self.head_layout == "multi_task":
            gqa = self.vil_prediction_gqa(pooled)
            if pooled.shape[0] % 2 == 0:
                binary = self.vil_binary_prediction(pooled.reshape(-1, pooled.shape[1] * 2))
            tri = self.vil_tri_prediction(pooled)
        h_v, h_t = out.sequence_output_v, out.sequence_output_t
        vision_logit = self.vision_logit(self.dropout(h_v)).float()
        if image_attention_mask is not None:
            vision_logit = vision_logit + ((1.0 - image_attention_mask.float()) * MASK_VALUE)[..., None]
        # Unmasked, as in the official code (only vision_logit gets the -10000 padding mask).
        linguisic_logit = self.linguisic_logit(self.dropout(h_t)).float()
        return ViLBERTVLTasksOutput(vil_prediction, gqa, vil_logit, binary, tri, vision_logit, linguisic_logit,
                                    pooled, h_t, h_v, out.attention_mask)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter elements (a tied weight counts once); works on the meta device."""
    return sum(p.numel() for p in model.parameters())

