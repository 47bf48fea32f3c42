"""ViLBERT: configuration, the two-stream model and its heads, checkpoint loading."""

from vilbert.model.checkpoints import (
    CheckpointError,
    config_from_hf_bert,
    init_text_from_hf_bert,
    load_checkpoint,
    load_tokenizer,
    read_state_dict,
)
from vilbert.model.configuration_vilbert import NAMED_CONFIGS, ViLBERTConfig
from vilbert.model.modeling_vilbert import (
    ViLBERTForPretraining,
    ViLBERTForVLTasks,
    ViLBERTModel,
    ViLBERTModelOutput,
    ViLBERTPretrainingOutput,
    ViLBERTVLTasksOutput,
    alignment_loss,
    count_parameters,
    grounding_loss,
    masked_lm_loss,
    masked_region_kl_loss,
    multiple_choice_loss,
    retrieval_loss,
    vqa_loss,
)

__all__ = [
    "NAMED_CONFIGS", "CheckpointError", "ViLBERTConfig", "ViLBERTForPretraining", "ViLBERTForVLTasks",
    "ViLBERTModel", "ViLBERTModelOutput", "ViLBERTPretrainingOutput", "ViLBERTVLTasksOutput", "alignment_loss",
    "config_from_hf_bert", "count_parameters", "grounding_loss", "init_text_from_hf_bert", "load_checkpoint",
    "load_tokenizer", "masked_lm_loss", "masked_region_kl_loss", "multiple_choice_loss", "read_state_dict",
    "retrieval_loss", "vqa_loss",
]
