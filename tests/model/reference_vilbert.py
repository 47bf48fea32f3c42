"""A plain, independent re-statement of the official ViLBERT equations, used only to check the model.

It works on a state dict (official key names) with explicit matmul/softmax attention and an explicit loop
over the layer schedule, following vilbert-multi-task `vilbert/vilbert.py` (BertEncoder.forward,
BertBiAttention, BertBiOutput, BertConnectionLayer) rather than our modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _lin(sd, name, x):
    return x @ sd[name + ".weight"].t() + sd[name + ".bias"]


def _ln(sd, name, x):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-12) * sd[name + ".weight"] + sd[name + ".bias"]


def _gelu(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _heads(x, n):
    b, l, w = x.shape
    return x.view(b, l, n, w // n).permute(0, 2, 1, 3)


def _attention(q, k, v, n, ext_mask):
    q, k, v = _heads(q, n), _heads(k, n), _heads(v, n)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + ext_mask
    probs = torch.softmax(scores, dim=-1)
    ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
    return ctx.view(ctx.shape[0], ctx.shape[1], -1)


def _bert_layer(sd, p, x, n_heads, ext_mask):
    ctx = _attention(_lin(sd, p + "attention.self.query", x), _lin(sd, p + "attention.self.key", x),
                     _lin(sd, p + "attention.self.value", x), n_heads, ext_mask)
    a = _ln(sd, p + "attention.output.LayerNorm", _lin(sd, p + "attention.output.dense", ctx) + x)
    i = _gelu(_lin(sd, p + "intermediate.dense", a))
    return _ln(sd, p + "output.LayerNorm", _lin(sd, p + "output.dense", i) + a)


def _co_layer(sd, p, v, v_ext, t, t_ext, n_heads):
    # BertBiAttention: stream 1 = vision, stream 2 = text.
    ctx1 = _attention(_lin(sd, p + "biattention.query2", t), _lin(sd, p + "biattention.key1", v),
                      _lin(sd, p + "biattention.value1", v), n_heads, v_ext)  # text attends to image
    ctx2 = _attention(_lin(sd, p + "biattention.query1", v), _lin(sd, p + "biattention.key2", t),
                      _lin(sd, p + "biattention.value2", t), n_heads, t_ext)  # image attends to text
    # BertBiOutput(hidden_states1=ctx2, input_tensor1=v, hidden_states2=ctx1, input_tensor2=t)
    v1 = _ln(sd, p + "biOutput.LayerNorm1", _lin(sd, p + "biOutput.dense1", ctx2) + v)
    t1 = _ln(sd, p + "biOutput.LayerNorm2", _lin(sd, p + "biOutput.dense2", ctx1) + t)
    v2 = _ln(sd, p + "v_output.LayerNorm", _lin(sd, p + "v_output.dense", _gelu(_lin(sd, p + "v_intermediate.dense", v1))) + v1)
    t2 = _ln(sd, p + "t_output.LayerNorm", _lin(sd, p + "t_output.dense", _gelu(_lin(sd, p + "t_intermediate.dense", t1))) + t1)
    return v2, t2


def reference_forward(sd, cfg, input_ids, image_feat, image_loc, token_type_ids, attention_mask, image_attention_mask,
                      task_ids=None):
    """Return (seq_t, seq_v, pooled_t, pooled_v, prediction_scores_t, prediction_scores_v, seq_relationship)."""
    sd = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    L = input_ids.shape[1]
    t = (sd["bert.embeddings.word_embeddings.weight"][input_ids]
         + sd["bert.embeddings.position_embeddings.weight"][torch.arange(L)][None]
         + sd["bert.embeddings.token_type_embeddings.weight"][token_type_ids])
    if task_ids is not None:
        task = sd["bert.embeddings.task_embeddings.weight"][task_ids.view(-1)][:, None]
        t = torch.cat([t[:, :1], task, t[:, 1:]], 1)
        attention_mask = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask], 1)
    t = _ln(sd, "bert.embeddings.LayerNorm", t)
    v = _ln(sd, "bert.v_embeddings.LayerNorm", _lin(sd, "bert.v_embeddings.image_embeddings", image_feat.double())
            + _lin(sd, "bert.v_embeddings.image_location_embeddings", image_loc.double()))
    t_ext = (1.0 - attention_mask[:, None, None, :].double()) * -10000.0
    v_ext = (1.0 - image_attention_mask[:, None, None, :].double()) * -10000.0

    # BertEncoder.forward: explicit loop over the (v_id, t_id) schedule.
    v_start = t_start = 0
    for count, (v_id, t_id) in enumerate(zip(cfg.v_biattention_id, cfg.t_biattention_id)):
        for idx in range(t_start, t_id):
            t = _bert_layer(sd, f"bert.encoder.layer.{idx}.", t, cfg.num_attention_heads, t_ext)
        for idx in range(v_start, v_id):
            v = _bert_layer(sd, f"bert.encoder.v_layer.{idx}.", v, cfg.v_num_attention_heads, v_ext)
        v, t = _co_layer(sd, f"bert.encoder.c_layer.{count}.", v, v_ext, t, t_ext, cfg.bi_num_attention_heads)
        v_start, t_start = v_id, t_id
    for idx in range(v_start, cfg.v_num_hidden_layers):
        v = _bert_layer(sd, f"bert.encoder.v_layer.{idx}.", v, cfg.v_num_attention_heads, v_ext)
    for idx in range(t_start, cfg.num_hidden_layers):
        t = _bert_layer(sd, f"bert.encoder.layer.{idx}.", t, cfg.num_attention_heads, t_ext)

    pooled_t = torch.relu(_lin(sd, "bert.t_pooler.dense", t[:, 0]))
    pooled_v = torch.relu(_lin(sd, "bert.v_pooler.dense", v[:, 0]))
    scores_t = scores_v = seq_rel = None
    if "cls.predictions.bias" in sd:
        h = _ln(sd, "cls.predictions.transform.LayerNorm", _gelu(_lin(sd, "cls.predictions.transform.dense", t)))
        scores_t = h @ sd["cls.predictions.decoder.weight"].t() + sd["cls.predictions.bias"]
        hv = _ln(sd, "cls.imagePredictions.transform.LayerNorm", _gelu(_lin(sd, "cls.imagePredictions.transform.dense", v)))
        scores_v = _lin(sd, "cls.imagePredictions.decoder", hv)
        fused = pooled_t * pooled_v if cfg.fusion_method == "mul" else pooled_t + pooled_v
        seq_rel = _lin(sd, "cls.bi_seq_relationship", fused)
    return t, v, pooled_t, pooled_v, scores_t, scores_v, seq_rel


def reference_pretraining_losses(scores_t, scores_v, seq_rel, masked_lm_labels, image_label, image_target,
                                 next_sentence_label):
    """The official loss formulas (with the max(n, 1) KL denominator fix)."""
    lm = F.cross_entropy(scores_t.reshape(-1, scores_t.shape[-1]), masked_lm_labels.reshape(-1), ignore_index=-1)
    logp = torch.log_softmax(scores_v[:, 1:], dim=2)
    kl = torch.nn.KLDivLoss(reduction="none")(logp, image_target.double())
    img = torch.sum(kl * (image_label == 1).unsqueeze(2).double()) / max(int(torch.sum(image_label == 1)), 1)
    nsp = F.cross_entropy(seq_rel.view(-1, 2), next_sentence_label.view(-1), ignore_index=-1)
    return lm, img, nsp


def make_batch(cfg, batch=3, seq_len=7, regions=5, seed=0, num_masked_regions=None):
    """Random inputs and labels in the official layout: [IMG] at region row 0, padding at the ends."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, cfg.vocab_size, (batch, seq_len), generator=g)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    attention_mask[1, seq_len - 2:] = 0  # padded caption
    token_type_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    token_type_ids[2, seq_len // 2:] = 1
    image_feat = torch.rand(batch, regions, cfg.v_feature_size, generator=g)
    image_loc = torch.rand(batch, regions, 5, generator=g)
    image_attention_mask = torch.ones(batch, regions, dtype=torch.long)
    image_attention_mask[0, regions - 1:] = 0  # padded region
    image_feat[0, regions - 1:] = 0
    image_loc[0, regions - 1:] = 0
    masked_lm_labels = torch.full((batch, seq_len), -1, dtype=torch.long)
    masked_lm_labels[0, 2] = 5
    masked_lm_labels[1, 1] = 7
    masked_lm_labels[2, 3] = 11
    masked_lm_labels[2, 5] = 1
    image_label = torch.full((batch, regions - 1), -1, dtype=torch.long)
    if num_masked_regions is None:
        image_label[0, 1] = 1
        image_label[1, 0] = 1
        image_label[1, 3] = 1
    else:
        image_label.view(-1)[:num_masked_regions] = 1
    logits = torch.randn(batch, regions - 1, cfg.v_target_size, generator=g)
    image_target = torch.softmax(logits, -1)
    next_sentence_label = torch.tensor([0, 1, 0][:batch] + [0] * max(0, batch - 3))
    return dict(input_ids=input_ids, image_feat=image_feat, image_loc=image_loc, token_type_ids=token_type_ids,
                attention_mask=attention_mask, image_attention_mask=image_attention_mask,
                masked_lm_labels=masked_lm_labels, image_label=image_label, image_target=image_target,
                next_sentence_label=next_sentence_label)


INPUT_KEYS = ("input_ids", "image_feat", "image_loc", "token_type_ids", "attention_mask", "image_attention_mask")
LABEL_KEYS = ("masked_lm_labels", "image_label", "image_target", "next_sentence_label")


def perturb_(model, seed=0, scale=0.3):
    """Give every parameter random values (LayerNorm gains around 1) so no term hides behind the init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1.0 + noise if name.endswith("LayerNorm.weight") else noise)
    return model
