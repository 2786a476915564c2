"""Conversion to and from Hugging Face's `MistralForCausalLM` (transformers is imported lazily)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmm.model.config import ModelConfig
from mmm.model.transformer import MMMTransformer

if TYPE_CHECKING:
    from transformers import MistralConfig, MistralForCausalLM


def _import_transformers() -> Any:
    import transformers

    # The config layout (rope_theta inside rope_parameters) is transformers 5's; 4.x would silently
    # ignore it and use its default theta.
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"the Mistral converters need transformers>=5, found {transformers.__version__}")
    return transformers


def to_hf_config(config: ModelConfig, attn_implementation: str = "sdpa") -> MistralConfig:
    """Equivalent ``transformers.MistralConfig`` (``attn_implementation``: "eager" or "sdpa")."""
    transformers = _import_transformers()
    if config.timing is not None or config.fill_program:
        raise ValueError(
            "this model reads musical times or target flags beside its ids (time_rope, target_embedding) or "
            "opens its fill section with the target's program (fill_program): Mistral has no equivalent, so it "
            "cannot be converted to a Hugging Face MistralForCausalLM"
        )
    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'eager' or 'sdpa', got {attn_implementation!r}")
    return transformers.MistralConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        hidden_act="silu",
        max_position_embeddings=config.max_seq_len,
        initializer_range=config.init_std,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        # transformers 5 keeps rope_theta inside rope_parameters (there is no config.rope_theta).
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        # Must be passed explicitly: MistralConfig defaults to a 4096-token window, not None.
        sliding_window=config.sliding_window,
        # MistralConfig defaults to Mistral-7B's tokenizer ids (bos=1, eos=2); they mean nothing
        # for MIDI tokens. A pad id would also make HF's nn.Embedding freeze that row's gradient.
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation=attn_implementation,
    )


def from_hf_config(hf_config: MistralConfig) -> ModelConfig:
    """``ModelConfig`` for a ``MistralConfig``; rejects settings this model cannot reproduce.

    Attention dropout is not carried over (this model has none); it does not change inference.
    """
    rope = hf_config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE is supported, got rope_type={rope['rope_type']!r}")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"only SiLU (SwiGLU) MLPs are supported, got hidden_act={hf_config.hidden_act!r}")
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    if hf_config.head_dim != head_dim:
        raise ValueError(
            f"head_dim must equal hidden_size / num_attention_heads = {head_dim}, got {hf_config.head_dim}"
        )
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads,
        intermediate_size=hf_config.intermediate_size,
        max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(rope.get("rope_theta", ModelConfig.rope_theta)),
        rms_norm_eps=hf_config.rms_norm_eps,
        sliding_window=hf_config.sliding_window,
        tie_word_embeddings=hf_config.tie_word_embeddings,
        init_std=hf_config.initializer_range,
    )


def to_hf_mistral(model: MMMTransformer, attn_implementation: str = "sdpa") -> MistralForCausalLM:
    """Copy ``model`` into a new ``transformers.MistralForCausalLM`` with the same device and dtype."""
    transformers = _import_transformers()
    ref = model.embed_tokens.weight
    # Built directly in the target dtype rather than cast with .to(dtype): casting would also round
    # HF's float32 RoPE inv_freq buffer (e.g. to bf16) and make its outputs drift from ours.
    hf_config = to_hf_config(model.config, attn_implementation)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=ref.dtype).to(ref.device)
    hf_model.load_state_dict({_to_hf_key(k): v for k, v in model.state_dict().items()}, strict=True)
    return hf_model.train(model.training)


def from_hf_mistral(hf_model: MistralForCausalLM) -> MMMTransformer:
    """Copy a ``transformers.MistralForCausalLM`` into a new ``MMMTransformer`` (same device and dtype)."""
    ref = hf_model.model.embed_tokens.weight
    model = MMMTransformer(from_hf_config(hf_model.config)).to(ref.device, ref.dtype)
    model.load_state_dict({_from_hf_key(k): v for k, v in hf_model.state_dict().items()}, strict=True)
    return model.train(hf_model.training)


def _to_hf_key(key: str) -> str:
    return key if key.startswith("lm_head.") else f"model.{key}"


def _from_hf_key(key: str) -> str:
    return key.removeprefix("model.")
