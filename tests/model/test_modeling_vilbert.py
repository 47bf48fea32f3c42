"""Tests for the ViLBERT model: checkpoint key layout, equations, losses, fast paths and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.model.reference_vilbert import (INPUT_KEYS, make_batch, perturb_, reference_forward,
                                           reference_pretraining_losses)
from vilbert.errors import ConfigError
from vilbert.model import (ViLBERTConfig, ViLBERTForPretraining, ViLBERTForVLTasks, count_parameters, grounding_loss,
                           masked_lm_loss, masked_region_kl_loss, multiple_choice_loss, retrieval_loss, vqa_loss)


def _inputs(batch):
    return {k: batch[k] for k in INPUT_KEYS}


def _official_pretraining_shapes() -> dict[str, tuple[int, ...]]:
    """The key/shape table of the released pretraining checkpoint, written out independently of the model."""
    s: dict[str, tuple[int, ...]] = {
        "bert.embeddings.word_embeddings.weight": (30522, 768),
        "bert.embeddings.position_embeddings.weight": (512, 768),
        "bert.embeddings.token_type_embeddings.weight": (2, 768),
        "bert.embeddings.LayerNorm.weight": (768,), "bert.embeddings.LayerNorm.bias": (768,),
        "bert.v_embeddings.image_embeddings.weight": (1024, 2048), "bert.v_embeddings.image_embeddings.bias": (1024,),
        "bert.v_embeddings.image_location_embeddings.weight": (1024, 5),
        "bert.v_embeddings.image_location_embeddings.bias": (1024,),
        "bert.v_embeddings.LayerNorm.weight": (1024,), "bert.v_embeddings.LayerNorm.bias": (1024,),
    }

    def lin(prefix, out, inp):
        s[prefix + ".weight"], s[prefix + ".bias"] = (out, inp), (out,)

    def ln(prefix, n):
        s[prefix + ".weight"], s[prefix + ".bias"] = (n,), (n,)

    for i in range(12):
        p = f"bert.encoder.layer.{i}."
        for n in ("query", "key", "value"):
            lin(p + "attention.self." + n, 768, 768)
        lin(p + "attention.output.dense", 768, 768)
        ln(p + "attention.output.LayerNorm", 768)
        lin(p + "intermediate.dense", 3072, 768)
        lin(p + "output.dense", 768, 3072)
        ln(p + "output.LayerNorm", 768)
    for i in range(6):
        p = f"bert.encoder.v_layer.{i}."
        for n in ("query", "key", "value"):
            lin(p + "attention.self." + n, 1024, 1024)
        lin(p + "attention.output.dense", 1024, 1024)
        ln(p + "attention.output.LayerNorm", 1024)
        lin(p + "intermediate.dense", 1024, 1024)
        lin(p + "output.dense", 1024, 1024)
        ln(p + "output.LayerNorm", 1024)
    for i in range(6):
        p = f"bert.encoder.c_layer.{i}."
        for n in ("query1", "key1", "value1"):
            lin(p + "biattention." + n, 1024, 1024)
        for n in ("query2", "key2", "value2"):
            lin(p + "biattention." + n, 1024, 768)
        lin(p + "biOutput.dense1", 1024, 1024)
        ln(p + "biOutput.LayerNorm1", 1024)
        lin(p + "biOutput.q_dense1", 1024, 1024)
        lin(p + "biOutput.dense2", 768, 1024)
        ln(p + "biOutput.LayerNorm2", 768)
        lin(p + "biOutput.q_dense2", 768, 1024)
        lin(p + "v_intermediate.dense", 1024, 1024)
        lin(p + "v_output.dense", 1024, 1024)
        ln(p + "v_output.LayerNorm", 1024)
        lin(p + "t_intermediate.dense", 3072, 768)
        lin(p + "t_output.dense", 768, 3072)
        ln(p + "t_output.LayerNorm", 768)
    lin("bert.t_pooler.dense", 1024, 768)
    lin("bert.v_pooler.dense", 1024, 1024)
    s["cls.predictions.bias"] = (30522,)
    lin("cls.predictions.transform.dense", 768, 768)
    ln("cls.predictions.transform.LayerNorm", 768)
    s["cls.predictions.decoder.weight"] = (30522, 768)
    lin("cls.bi_seq_relationship", 2, 1024)
    lin("cls.imagePredictions.transform.dense", 1024, 1024)
    ln("cls.imagePredictions.transform.LayerNorm", 1024)
    lin("cls.imagePredictions.decoder", 1601, 1024)
    return s


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ key layout
def test_base_pretraining_keys_and_parameter_count_match_the_release():
    with torch.device("meta"):
        model = ViLBERTForPretraining(ViLBERTConfig())
    expected = _official_pretraining_shapes()
    assert len(expected) == 533
    assert _shapes(model) == expected
    assert count_parameters(model) == 250_044_029
    # The decoder is tied to the word embeddings but saved under its own key.
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_base_multi_task_keys_and_parameter_count_match_the_release():
    with torch.device("meta"):
        model = ViLBERTForVLTasks(ViLBERTConfig(task_specific_tokens=True), num_labels=3129)
    shapes = _shapes(model)
    assert len(shapes) == 560
    assert count_parameters(model) == 268_028_859
    added = {k: v for k, v in shapes.items() if k not in _official_pretraining_shapes()}
    assert added == {
        "bert.embeddings.task_embeddings.weight": (20, 768),
        "vil_prediction.logit_fc.0.weight": (2048, 1024), "vil_prediction.logit_fc.0.bias": (2048,),
        "vil_prediction.logit_fc.2.weight": (2048,), "vil_prediction.logit_fc.2.bias": (2048,),
        "vil_prediction.logit_fc.3.weight": (3129, 2048), "vil_prediction.logit_fc.3.bias": (3129,),
        "vil_prediction_gqa.logit_fc.0.weight": (2048, 1024), "vil_prediction_gqa.logit_fc.0.bias": (2048,),
        "vil_prediction_gqa.logit_fc.2.weight": (2048,), "vil_prediction_gqa.logit_fc.2.bias": (2048,),
        "vil_prediction_gqa.logit_fc.3.weight": (1533, 2048), "vil_prediction_gqa.logit_fc.3.bias": (1533,),
        "vil_binary_prediction.logit_fc.0.weight": (2048, 2048), "vil_binary_prediction.logit_fc.0.bias": (2048,),
        "vil_binary_prediction.logit_fc.2.weight": (2048,), "vil_binary_prediction.logit_fc.2.bias": (2048,),
        "vil_binary_prediction.logit_fc.3.weight": (2, 2048), "vil_binary_prediction.logit_fc.3.bias": (2,),
        "vil_logit.weight": (1, 1024), "vil_logit.bias": (1,),
        "vil_tri_prediction.weight": (3, 1024), "vil_tri_prediction.bias": (3,),
        "vision_logit.weight": (1, 1024), "vision_logit.bias": (1,),
        "linguisic_logit.weight": (1, 768), "linguisic_logit.bias": (1,),
    }


def test_beta_head_layout_is_weight_normed():
    with torch.device("meta"):
        model = ViLBERTForVLTasks(ViLBERTConfig(), num_labels=3129, head_layout="beta")
    heads = {k: v for k, v in _shapes(model).items() if not k.startswith(("bert.", "cls."))}
    assert heads == {
        "vil_prediction.main.0.weight_g": (), "vil_prediction.main.0.weight_v": (2048, 1024),
        "vil_prediction.main.0.bias": (2048,), "vil_prediction.main.3.weight_g": (),
        "vil_prediction.main.3.weight_v": (3129, 2048), "vil_prediction.main.3.bias": (3129,),
        "vil_logit.weight": (1, 1024), "vil_logit.bias": (1,), "vision_logit.weight": (1, 1024),
        "vision_logit.bias": (1,), "linguisic_logit.weight": (1, 768), "linguisic_logit.bias": (1,),
    }


def test_weight_norm_head_matches_torch_weight_norm():
    torch.manual_seed(0)
    ours = ViLBERTForVLTasks(ViLBERTConfig.from_name("tiny"), num_labels=7, head_layout="beta").vil_prediction.main[0]
    ref = torch.nn.Linear(48, 96)
    with torch.no_grad():
        ref.weight.copy_(ours.weight_v)
        ref.bias.copy_(ours.bias)
    with pytest.warns(FutureWarning):
        ref = torch.nn.utils.weight_norm(ref, dim=None)
    with torch.no_grad():
        ours.weight_g.fill_(2.5)
        ref.weight_g.fill_(2.5)
    x = torch.randn(4, 48)
    torch.testing.assert_close(ours(x), ref(x))
    assert set(dict(ref.named_parameters())) == set(dict(ours.named_parameters()))


def test_strict_state_dict_round_trip():
    cfg = ViLBERTConfig.from_name("tiny")
    a = perturb_(ViLBERTForPretraining(cfg), seed=1).eval()
    b = ViLBERTForPretraining(cfg).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    batch = make_batch(cfg)
    oa, ob = a(**_inputs(batch)), b(**_inputs(batch))
    torch.testing.assert_close(oa.prediction_scores_t, ob.prediction_scores_t, rtol=0, atol=0)
    torch.testing.assert_close(oa.seq_relationship_score, ob.seq_relationship_score, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ equations
@pytest.mark.parametrize("fusion, schedule", [
    ("mul", None),
    ("sum", None),
    ("mul", {"v_biattention_id": (1, 2), "t_biattention_id": (2, 3)}),  # co-layers after the last layers
    ("mul", {"v_biattention_id": (0, 1), "t_biattention_id": (0, 1)}),  # no text-only prefix
])
def test_forward_equals_reference_equations(fusion, schedule):
    cfg = ViLBERTConfig.from_name("tiny", fusion_method=fusion, **(schedule or {}))
    model = perturb_(ViLBERTForPretraining(cfg)).eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        out = model(**_inputs(batch))
        enc = model.bert(**_inputs(batch))
    ref = reference_forward(model.state_dict(), cfg, **_inputs(batch))
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.sequence_output_t.double(), ref[0], **tol)
    torch.testing.assert_close(enc.sequence_output_v.double(), ref[1], **tol)
    torch.testing.assert_close(enc.pooled_output_t.double(), ref[2], **tol)
    torch.testing.assert_close(enc.pooled_output_v.double(), ref[3], **tol)
    torch.testing.assert_close(out.prediction_scores_t.double(), ref[4], **tol)
    torch.testing.assert_close(out.prediction_scores_v.double(), ref[5], **tol)
    torch.testing.assert_close(out.seq_relationship_score.double(), ref[6], **tol)
    # The perturbed weights make the attention far from uniform, so the masks matter here.
    assert ref[0].std() > 0.1


def test_task_token_equals_reference():
    cfg = ViLBERTConfig.from_name("tiny", task_specific_tokens=True)
    model = perturb_(ViLBERTForVLTasks(cfg, num_labels=5)).eval()
    batch = make_batch(cfg)
    task_ids = torch.tensor([1, 4, 19])
    with torch.no_grad():
        out = model(**_inputs(batch), task_ids=task_ids)
    ref = reference_forward(model.state_dict(), cfg, **_inputs(batch), task_ids=task_ids)
    assert out.sequence_output_t.shape[1] == batch["input_ids"].shape[1] + 1
    torch.testing.assert_close(out.sequence_output_t.double(), ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.sequence_output_v.double(), ref[1], rtol=1e-5, atol=1e-5)
    # Padding keeps its place after the inserted task token.
    assert out.attention_mask[1].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]


def test_text_prefix_reuse_equals_full_forward():
    cfg = ViLBERTConfig.from_name("tiny")
    model = perturb_(ViLBERTForVLTasks(cfg, num_labels=5)).eval()
    batch = {k: v[1:2] for k, v in make_batch(cfg).items()}  # one caption, with padding
    images = make_batch(cfg, batch=3, seed=3)
    with torch.no_grad():
        full = model(batch["input_ids"].expand(3, -1), images["image_feat"], images["image_loc"],
                     attention_mask=batch["attention_mask"].expand(3, -1),
                     image_attention_mask=images["image_attention_mask"])
        h, mask = model.bert.encode_text_prefix(batch["input_ids"], attention_mask=batch["attention_mask"])
        fast = model(None, images["image_feat"], images["image_loc"], image_attention_mask=images["image_attention_mask"],
                     text_prefix=(h.expand(3, -1, -1), mask.expand(3, -1)))
    torch.testing.assert_close(fast.vil_logit, full.vil_logit, rtol=1e-5, atol=1e-5)


def test_vl_task_heads_shapes_and_masks():
    cfg = ViLBERTConfig.from_name("tiny")
    model = ViLBERTForVLTasks(cfg, num_labels=9).eval()
    batch = make_batch(cfg, batch=4)
    with torch.no_grad():
        out = model(**_inputs(batch))
    assert out.vil_prediction.shape == (4, 9)
    assert out.vil_prediction_gqa.shape == (4, 1533)
    assert out.vil_binary_prediction.shape == (2, 2)
    assert out.vil_tri_prediction.shape == (4, 3)
    assert out.vil_logit.shape == (4, 1)
    assert out.vision_logit.shape == (4, 5, 1) and out.linguisic_logit.shape == (4, 7, 1)
    assert out.vision_logit[0, 4, 0] < -9000 and out.vision_logit[0, 3, 0] > -100
    assert out.linguisic_logit[1, 6, 0] > -100  # unmasked, as in the official code
    with torch.no_grad():
        odd = model(**_inputs(make_batch(cfg, batch=3)))
    assert odd.vil_binary_prediction is None


# ------------------------------------------------------------------------------------------ losses
def test_pretraining_losses_equal_official_formulas_sparse_and_dense():
    cfg = ViLBERTConfig.from_name("tiny")
    model = perturb_(ViLBERTForPretraining(cfg)).eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        sparse = model(**batch)
        model.sparse_heads = False
        dense = model(**batch)
    ref = reference_forward(model.state_dict(), cfg, **_inputs(batch))
    lm, img, nsp = reference_pretraining_losses(ref[4], ref[5], ref[6], batch["masked_lm_labels"], batch["image_label"],
                                                batch["image_target"], batch["next_sentence_label"])
    for out in (sparse, dense):
        torch.testing.assert_close(out.masked_lm_loss.double(), lm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.masked_img_loss.double(), img, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.next_sentence_loss.double(), nsp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss.double(), lm + img + nsp, rtol=1e-5, atol=1e-5)
    assert sparse.prediction_scores_t.shape == (4, cfg.vocab_size)  # only the 4 labelled tokens
    assert sparse.prediction_scores_v.shape == (3, cfg.v_target_size)  # only the 3 masked regions
    assert dense.prediction_scores_t.shape == (3, 7, cfg.vocab_size)


def test_zero_masked_regions_gives_finite_loss_and_gradients():
    cfg = ViLBERTConfig.from_name("tiny")
    model = ViLBERTForPretraining(cfg).train()
    batch = make_batch(cfg, num_masked_regions=0)
    for sparse in (True, False):
        model.sparse_heads = sparse
        model.zero_grad()
        out = model(**batch)
        assert out.masked_img_loss.item() == 0.0
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_region_kl_loss_hand_computed():
    target = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]])  # (1, 2, 3)
    logp = torch.log(torch.tensor([[[0.25, 0.5, 0.25], [0.5, 0.25, 0.25]]]))
    selected = torch.tensor([[True, True]])
    # KL row 0: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.5) = 0.5 ln 2; row 1: ln(1/0.5) = ln 2; mean over 2 rows.
    expected = (0.5 * math.log(2) + math.log(2)) / 2
    assert masked_region_kl_loss(logp, target, selected).item() == pytest.approx(expected, rel=1e-6)
    assert masked_region_kl_loss(logp, target, torch.tensor([[False, True]])).item() == pytest.approx(math.log(2))
    assert masked_region_kl_loss(logp, target, torch.tensor([[False, False]])).item() == 0.0


def test_mlm_loss_hand_computed_and_empty():
    scores = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    labels = torch.tensor([[0, -1]])
    assert masked_lm_loss(scores, labels).item() == pytest.approx(math.log(2), rel=1e-6)
    assert masked_lm_loss(scores, torch.tensor([[-1, -1]])).item() == 0.0


def test_objectives_change_which_losses_count():
    cfg1 = ViLBERTConfig.from_name("tiny", objective=1)
    model = perturb_(ViLBERTForPretraining(cfg1)).eval()
    batch = make_batch(cfg1)
    with torch.no_grad():
        out1 = model(**batch)
        labels = batch["masked_lm_labels"].clone()
        labels[1] = -1  # sample 1 is not aligned: its masked tokens and regions do not count
        image_label = batch["image_label"].clone()
        image_label[1] = -1
        model0 = ViLBERTForPretraining(cfg1.replace(objective=0)).eval()
        model0.load_state_dict(model.state_dict())
        out0 = model0(**{**batch, "masked_lm_labels": labels, "image_label": image_label})
        model2 = ViLBERTForPretraining(cfg1.replace(objective=2)).eval()
        model2.load_state_dict(model.state_dict())
        out2 = model2(**{**batch, "next_sentence_label": None})
    torch.testing.assert_close(out1.loss, out0.loss)
    assert out2.next_sentence_loss.item() == 0.0
    assert out2.loss.item() == pytest.approx(out2.masked_lm_loss.item() + out2.masked_img_loss.item(), rel=1e-6)


def test_task_losses_hand_computed():
    logits = torch.tensor([[0.0, 2.0]])
    soft = torch.tensor([[1.0, 0.3]])
    bce = -(math.log(0.5) + 0.3 * math.log(torch.sigmoid(torch.tensor(2.0)).item())
            + 0.7 * math.log(1 - torch.sigmoid(torch.tensor(2.0)).item())) / 2
    assert vqa_loss(logits, soft).item() == pytest.approx(bce * 2, rel=1e-6)

    vil_logit = torch.tensor([[3.0], [1.0], [0.0], [1.0], [0.0], [2.0], [0.0], [0.0]])  # 2 groups of 4
    expected = (-F.log_softmax(torch.tensor([3.0, 1.0, 0.0, 1.0]), 0)[0]
                - F.log_softmax(torch.tensor([0.0, 2.0, 0.0, 0.0]), 0)[0]) / 2
    assert retrieval_loss(vil_logit).item() == pytest.approx(expected.item(), rel=1e-6)
    assert multiple_choice_loss(vil_logit, torch.tensor([0, 1]), 4).item() == pytest.approx(
        ((-F.log_softmax(torch.tensor([3.0, 1.0, 0.0, 1.0]), 0)[0])
         - F.log_softmax(torch.tensor([0.0, 2.0, 0.0, 0.0]), 0)[1]).item() / 2, rel=1e-6)

    vision_logit = torch.tensor([[[0.0], [0.0], [5.0]]])
    target = torch.tensor([[1.0, 0.0, 1.0]])
    mask = torch.tensor([[1, 1, 0]])  # the third region is padding: ignored despite its huge error
    assert grounding_loss(vision_logit, target, mask).item() == pytest.approx(2 * math.log(2), rel=1e-6)


# ------------------------------------------------------------------------------------------ training paths
def test_gradients_reach_every_trainable_parameter():
    cfg = ViLBERTConfig.from_name("tiny")
    model = ViLBERTForPretraining(cfg).train()
    batch = make_batch(cfg)
    model(**batch).loss.backward()
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    # Only the official dead projections are frozen (the forward never uses them) ...
    assert frozen == sorted(f"bert.encoder.c_layer.{i}.biOutput.q_dense{j}.{w}"
                            for i in range(2) for j in (1, 2) for w in ("weight", "bias"))
    # ... and every other parameter gets a non-zero gradient.
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []


def test_vl_tasks_gradients_reach_heads_and_task_tokens():
    cfg = ViLBERTConfig.from_name("tiny", task_specific_tokens=True)
    model = ViLBERTForVLTasks(cfg, num_labels=5).train()
    batch = make_batch(cfg, batch=4)
    out = model(**_inputs(batch), task_ids=torch.tensor([1, 1, 2, 2]))
    loss = (vqa_loss(out.vil_prediction, torch.rand(4, 5)) + out.vil_prediction_gqa.sum() * 0.01
            + out.vil_binary_prediction.sum() + out.vil_tri_prediction.sum() + retrieval_loss(out.vil_logit)
            + grounding_loss(out.vision_logit, torch.rand(4, 5), batch["image_attention_mask"])
            + out.linguisic_logit.clamp(min=-100).sum())
    loss.backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("cls.") or ".q_dense" in n for n in frozen)
    assert model.bert.embeddings.word_embeddings.weight.requires_grad  # tied with cls.predictions.decoder
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_grad == []


def test_fixed_text_layers_get_no_gradient():
    cfg = ViLBERTConfig.from_name("tiny", fixed_t_layer=1)
    model = ViLBERTForPretraining(cfg).train()
    model(**make_batch(cfg)).loss.backward()
    assert model.bert.encoder.layer[0].output.dense.weight.grad is None
    assert model.bert.encoder.layer[1].output.dense.weight.grad is not None


def test_bf16_autocast_close_to_fp32():
    cfg = ViLBERTConfig.from_name("tiny")
    model = ViLBERTForPretraining(cfg).eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        ref = model(**batch).loss
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**batch)
    assert low.loss.dtype == torch.float32
    assert low.loss.item() == pytest.approx(ref.item(), rel=2e-2)


@pytest.mark.parametrize("flag", [{"dynamic_attention": True}, {"with_coattention": False},
                                  {"in_batch_pairs": True}, {"visual_target": 2}])
def test_unsupported_official_flags_are_refused(flag):
    with pytest.raises(ConfigError, match=next(iter(flag))):
        ViLBERTForPretraining(ViLBERTConfig.from_name("tiny", **flag))


def test_unknown_head_layout_lists_valid_ones():
    with pytest.raises(ConfigError, match="multi_task"):
        ViLBERTForVLTasks(ViLBERTConfig.from_name("tiny"), head_layout="mmf")


@pytest.mark.gpu
def test_cuda_bf16_step_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = ViLBERTConfig.from_name("tiny")
    model = perturb_(ViLBERTForPretraining(cfg)).eval()
    batch = make_batch(cfg)
    with torch.no_grad():
        ref = model(**batch)
        gpu = model.cuda()(**{k: v.cuda() for k, v in batch.items()})
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(**{k: v.cuda() for k, v in batch.items()})
    torch.testing.assert_close(gpu.loss.cpu(), ref.loss, rtol=1e-4, atol=1e-4)
    assert low.loss.item() == pytest.approx(ref.loss.item(), rel=3e-2)


def test_initialisation_follows_the_official_scheme():
    torch.manual_seed(0)
    cfg = ViLBERTConfig.from_name("small")
    model = ViLBERTForVLTasks(cfg, num_labels=10, head_layout="beta")
    sd = model.state_dict()
    for name, t in sd.items():
        if "LayerNorm" in name or name.endswith("logit_fc.2.weight"):
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(t == expected), name
        elif name.endswith(".bias"):
            assert torch.all(t == 0), name
        elif name.endswith(".weight") and t.numel() > 2000:
            assert abs(t.std().item() - cfg.initializer_range) < 0.002, name
    wn = model.vil_prediction.main[0]
    torch.testing.assert_close(wn.weight_g, wn.weight_v.norm())


@pytest.mark.slow
def test_base_config_runs_a_training_step_on_cpu():
    cfg = ViLBERTConfig()
    model = ViLBERTForPretraining(cfg).train()
    batch = make_batch(cfg, batch=3, seq_len=12, regions=6)
    batch["input_ids"] = batch["input_ids"].clamp(max=cfg.vocab_size - 1)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # At init the MLM loss is about ln(vocab) and the alignment loss about ln(2).
    assert out.masked_lm_loss.item() == pytest.approx(math.log(cfg.vocab_size), rel=0.1)
    assert out.next_sentence_loss.item() == pytest.approx(math.log(2), rel=0.2)
    out.loss.backward()
    assert model.bert.encoder.c_layer[5].biattention.query2.weight.grad is not None
