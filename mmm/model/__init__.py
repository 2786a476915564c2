"""The model: its config (`config`), the network and its loss (`transformer`), rotary embeddings
(`rope`), masks and packed rows (`masks`, `packed_attention`), the eager KV cache (`kv_cache`),
the Hugging Face Mistral adapter (`hf`) and checkpoint folders (`pretrained`)."""

from mmm.model.config import PRESETS, ModelConfig, model_config_from_preset
from mmm.model.transformer import MMMTransformer, next_token_nll

__all__ = ["PRESETS", "MMMTransformer", "ModelConfig", "model_config_from_preset", "next_token_nll"]
