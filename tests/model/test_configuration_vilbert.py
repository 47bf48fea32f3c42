"""Tests for ViLBERTConfig: official JSON files, defaults, validation and named configs."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vilbert.errors import ConfigError, SourceNotFoundError
from vilbert.model import NAMED_CONFIGS, ViLBERTConfig

# config/bert_base_6layer_6conect.json of vilbert_beta and vilbert-multi-task (byte-identical there).
OFFICIAL_6LAYER_6CONECT = {
    "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 512, "num_attention_heads": 12,
    "num_hidden_layers": 12, "type_vocab_size": 2, "vocab_size": 30522, "v_feature_size": 2048,
    "v_target_size": 1601, "v_hidden_size": 1024, "v_num_hidden_layers": 6, "v_num_attention_heads": 8,
    "v_intermediate_size": 1024, "bi_hidden_size": 1024, "bi_num_attention_heads": 8, "bi_intermediate_size": 1024,
    "bi_attention_type": 1, "v_attention_probs_dropout_prob": 0.1, "v_hidden_act": "gelu",
    "v_hidden_dropout_prob": 0.1, "v_initializer_range": 0.02, "v_biattention_id": [0, 1, 2, 3, 4, 5],
    "t_biattention_id": [6, 7, 8, 9, 10, 11], "pooling_method": "mul",
}


def test_official_json_loads_and_equals_defaults(tmp_path):
    path = tmp_path / "bert_base_6layer_6conect.json"
    path.write_text(json.dumps(OFFICIAL_6LAYER_6CONECT, indent=2))
    cfg = ViLBERTConfig.from_json_file(path)
    assert cfg == ViLBERTConfig()
    assert cfg.v_biattention_id == (0, 1, 2, 3, 4, 5) and cfg.num_co_layers == 6
    assert cfg.fusion_method == "mul" and cfg.task_specific_tokens is False


def test_sibling_config_with_other_schedule(tmp_path):
    data = {**OFFICIAL_6LAYER_6CONECT, "v_num_hidden_layers": 2, "v_biattention_id": [0, 1],
            "t_biattention_id": [10, 11]}
    path = tmp_path / "bert_base_2layer_2conect.json"
    path.write_text(json.dumps(data))
    cfg = ViLBERTConfig.from_json_file(path)
    assert cfg.t_biattention_id == (10, 11) and cfg.num_co_layers == 2


def test_json_round_trip(tmp_path):
    cfg = ViLBERTConfig.from_name("small", task_specific_tokens=True, visual_target=1, v_target_size=2048)
    cfg.to_json_file(tmp_path / "sub" / "config.json")
    assert ViLBERTConfig.from_json_file(tmp_path / "sub" / "config.json") == cfg
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name != "config.json"]  # no temp file left


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**OFFICIAL_6LAYER_6CONECT, "hiden_size": 3}))
    with pytest.raises(ConfigError, match=r"bad\.json.*hiden_size.*valid keys.*hidden_size"):
        ViLBERTConfig.from_json_file(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SourceNotFoundError, match="nope.json"):
        ViLBERTConfig.from_json_file(tmp_path / "nope.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ViLBERTConfig.from_json_file(tmp_path / "list.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="broken.json"):
        ViLBERTConfig.from_json_file(tmp_path / "broken.json")


@pytest.mark.parametrize("changes, match", [
    ({"hidden_size": 770}, "num_attention_heads"),
    ({"v_biattention_id": [0, 1]}, "same length"),
    ({"t_biattention_id": [6, 6, 8, 9, 10, 11]}, "increasing"),
    ({"t_biattention_id": [6, 7, 8, 9, 10, 13]}, "num_hidden_layers"),
    ({"fusion_method": "cat"}, "fusion_method"),
    ({"objective": 3}, "objective"),
])
def test_inconsistent_values_are_refused(changes, match):
    with pytest.raises(ConfigError, match=match):
        ViLBERTConfig().replace(**changes)


def test_config_is_frozen_and_named_configs_build():
    cfg = ViLBERTConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3  # type: ignore[misc]
    assert set(NAMED_CONFIGS) >= {"base", "small", "tiny"}
    small = ViLBERTConfig.from_name("small")
    assert (small.num_hidden_layers, small.hidden_size, small.num_attention_heads, small.intermediate_size) == (
        6, 384, 12, 1536)
    with pytest.raises(ConfigError, match="valid names"):
        ViLBERTConfig.from_name("huge")


# config/roberta_base_6layer_6connect.json of vilbert-multi-task: transformers' PretrainedConfig keys too.
ROBERTA_6LAYER_6CONNECT = {
    **OFFICIAL_6LAYER_6CONECT, "finetuning_task": None, "layer_norm_eps": 1e-12, "max_position_embeddings": 514,
    "num_labels": 2, "output_attentions": False, "output_hidden_states": False, "torchscript": False,
    "type_vocab_size": 1, "vocab_size": 50265, "model": "roberta",
}


def test_roberta_sibling_config_reads_but_its_model_is_refused(tmp_path):
    from vilbert.model import ViLBERTForPretraining

    path = tmp_path / "roberta_base_6layer_6connect.json"
    path.write_text(json.dumps(ROBERTA_6LAYER_6CONNECT))
    cfg = ViLBERTConfig.from_json_file(path)
    assert cfg.model == "roberta" and cfg.vocab_size == 50265
    with pytest.raises(ConfigError, match="model"):
        ViLBERTForPretraining(cfg.replace(vocab_size=50, hidden_size=32, num_attention_heads=4))


def test_old_config_with_co_layer_after_the_last_layer(tmp_path):
    # config/bert_config.json: t_biattention_id ends at num_hidden_layers (a co-layer after the last text layer).
    data = {**OFFICIAL_6LAYER_6CONECT, "v_hidden_size": 2048, "v_num_hidden_layers": 3, "v_num_attention_heads": 16,
            "v_intermediate_size": 512, "bi_num_attention_heads": 16, "v_initializer_range": 0.2,
            "v_biattention_id": [1, 2, 3], "t_biattention_id": [10, 11, 12]}
    path = tmp_path / "bert_config.json"
    path.write_text(json.dumps(data))
    assert ViLBERTConfig.from_json_file(path).t_biattention_id == (10, 11, 12)
