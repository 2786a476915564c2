import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from mmm.model import PRESETS, MMMTransformer, ModelConfig, model_config_from_preset
from mmm.model.hf import from_hf_config, from_hf_mistral, to_hf_config, to_hf_mistral

try:  # optional (the train and dev extras): only the comparisons with its Mistral need it
    import transformers
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(
    transformers is None, reason="transformers is not installed (pip install -e '.[dev]')"
)

VOCAB = 61


def make_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
        max_seq_len=64,
        rope_theta=5000.0,
        attention="sdpa",
    )
    return ModelConfig(**{**base, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length))


CONFIGS = {
    "gqa": dict(),
    "sliding_window": dict(sliding_window=5),
    "tied": dict(tie_word_embeddings=True, num_kv_heads=4),
}


@needs_transformers
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_hf_mistral_both_directions(name, attention):
    ids = random_ids(2, 20)  # longer than the sliding window
    ours = MMMTransformer(make_config(attention=attention, **CONFIGS[name])).eval()
    hf = to_hf_mistral(ours, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)

    # The other direction, starting from HF's own initialisation.
    hf = transformers.MistralForCausalLM(to_hf_config(make_config(**CONFIGS[name]), "eager")).eval()
    ours = from_hf_mistral(hf)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids, use_cache=False).logits, atol=1e-5, rtol=1e-5)


@needs_transformers
def test_bf16_export_matches_exactly():
    # A bf16 HF model made with .to(bfloat16) rounds its RoPE frequencies; the export must not.
    ours = MMMTransformer(make_config(sliding_window=5)).to(torch.bfloat16).eval()
    hf = to_hf_mistral(ours).eval()
    assert hf.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids, use_cache=False).logits, atol=0, rtol=0)


def test_sliding_window_only_affects_positions_past_the_window():
    window = 5
    ids = random_ids(1, 20)
    full = MMMTransformer(make_config()).eval()
    windowed = MMMTransformer(make_config(sliding_window=window)).eval()
    windowed.load_state_dict(full.state_dict())
    with torch.no_grad():
        a, b = full(ids), windowed(ids)
    torch.testing.assert_close(a[:, :window], b[:, :window])
    assert (a[:, window:] - b[:, window:]).abs().amax(-1).min() > 1e-4


@needs_transformers
def test_hf_config_fields():
    cfg = make_config(sliding_window=7, tie_word_embeddings=True)
    hf_cfg = to_hf_config(cfg, "eager")
    assert hf_cfg.rope_parameters == {"rope_type": "default", "rope_theta": 5000.0}
    assert hf_cfg.sliding_window == 7 and hf_cfg.head_dim == 16 and hf_cfg.max_position_embeddings == 64
    assert hf_cfg._attn_implementation == "eager"
    assert to_hf_config(make_config()).sliding_window is None  # not MistralConfig's 4096 default
    assert from_hf_config(hf_cfg).to_dict() == {**cfg.to_dict(), "attention": "auto"}


@needs_transformers
def test_from_hf_config_rejects_unsupported_rope():
    hf_cfg = to_hf_config(make_config())
    hf_cfg.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="rope_type"):
        from_hf_config(hf_cfg)


@needs_transformers
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_keeps_state_dict_bit_identical(tied):
    # attention is a runtime choice that HF configs do not carry; it comes back as "auto".
    ours = MMMTransformer(make_config(attention="auto", tie_word_embeddings=tied, num_kv_heads=4 if tied else 2))
    back = from_hf_mistral(to_hf_mistral(ours))
    original, restored = ours.state_dict(), back.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert back.config == ours.config
    if tied:
        assert back.lm_head.weight is back.embed_tokens.weight


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("window", [None, 3])
def test_kv_cache_incremental_decoding_matches_full_forward(attention, window):
    model = MMMTransformer(make_config(attention=attention, sliding_window=window)).eval()
    ids = random_ids(3, 14)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=3, max_len=16)
        # Prefill a prompt, then a multi-token block on top of the prefix, then one token per step.
        steps = [model(ids[:, :5], cache), model(ids[:, 5:9], cache)]
        steps += [model(ids[:, t : t + 1], cache) for t in range(9, 14)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_repeat_and_crop():
    model = MMMTransformer(make_config()).eval()
    prompt = random_ids(1, 6)
    with torch.no_grad():
        cache = model.new_cache(batch_size=1, max_len=10)
        model(prompt, cache)
        variations = cache.repeat(3)
        assert variations.batch_size == 3 and variations.length == 6
        nxt = torch.full((3, 1), 7)
        rows = model(nxt, variations)
        for row in rows[1:]:
            torch.testing.assert_close(row, rows[0], atol=0, rtol=0)
        full = model(torch.cat([prompt, nxt[:1]], dim=1))
        torch.testing.assert_close(rows[0], full[0, -1:], atol=1e-5, rtol=1e-5)

        # The original cache is independent of the copies; cropping rewinds it.
        assert cache.length == 6
        model(torch.tensor([[3, 4]]), cache)
        cache.crop(6)
        torch.testing.assert_close(model(nxt[:1], cache), rows[:1], atol=1e-5, rtol=1e-5)


def test_kv_cache_errors():
    model = MMMTransformer(make_config()).eval()
    cache = model.new_cache(batch_size=2, max_len=4)
    with pytest.raises(ValueError, match="overflow"):
        model(random_ids(2, 5), cache)
    with pytest.raises(ValueError, match="batch size"):
        model(random_ids(1, 2), cache)
    with pytest.raises(ValueError, match="dtype"):
        model(random_ids(2, 2), model.new_cache(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="crop"):
        cache.crop(1)


def body_params_formula(h: int, layers: int, heads: int, kv_heads: int, ffn: int) -> int:
    d = h // heads
    attention = h * heads * d * 2 + h * kv_heads * d * 2  # q, o + k, v
    mlp = 3 * h * ffn
    return layers * (attention + mlp + 2 * h) + h  # + two norms per layer, final norm


def test_base_preset_is_the_published_size():
    assert PRESETS["base"] == dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1536)
    cfg = model_config_from_preset("base", vocab_size=500, max_seq_len=2048)
    model = MMMTransformer(cfg)
    body = body_params_formula(512, 8, 8, 4, 1536)
    assert body == 25_174_528
    assert model.num_parameters(exclude_embeddings=True) == body
    assert model.num_parameters() == body + 2 * 500 * 512


def test_tiny_and_small_presets_and_overrides():
    tiny = MMMTransformer(model_config_from_preset("tiny", vocab_size=100, max_seq_len=128))
    assert tiny.num_parameters(exclude_embeddings=True) == body_params_formula(128, 4, 4, 2, 384)
    tied = model_config_from_preset("small", 100, 128, tie_word_embeddings=True, num_layers=2)
    model = MMMTransformer(tied)
    assert tied.num_layers == 2 and tied.hidden_size == 256
    assert model.num_parameters() == body_params_formula(256, 2, 8, 4, 768) + 100 * 256


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="tiny.*small|base"):
        model_config_from_preset("huge", vocab_size=10, max_seq_len=10)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(hidden_size=60), "hidden_size"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_layers=-1), "num_layers"),
        (dict(attention="fast"), "attention"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        make_config(**overrides)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = make_config(sliding_window=8)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelConfig.from_dict({**cfg.to_dict(), "hidden_sise": 3})
    with pytest.raises(ValueError, match="Unknown.*n_layer"):
        model_config_from_preset("tiny", 10, 10, n_layer=2)
    data = cfg.to_dict()
    del data["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        ModelConfig.from_dict(data)


def test_model_revalidates_mutated_config():
    cfg = make_config()
    cfg.num_heads = 5
    with pytest.raises(ValueError, match="num_heads"):
        MMMTransformer(cfg)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_flash_without_flash_attn_explains_how_to_install():
    with pytest.raises(ImportError, match=r"mmm\[gpu\]"):
        MMMTransformer(make_config(attention="flash"))
    MMMTransformer(make_config(attention="auto"))  # "auto" falls back silently


def test_residual_projections_use_scaled_init():
    cfg = make_config(num_layers=8, hidden_size=128, intermediate_size=512)
    model = MMMTransformer(cfg)
    residual = [w for layer in model.layers for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]
    std = torch.cat([w.flatten() for w in residual]).std()
    assert std.item() == pytest.approx(cfg.init_std / math.sqrt(2 * cfg.num_layers), rel=0.05)
    assert model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)


@pytest.mark.slow
def test_tiny_model_overfits_one_batch():
    model = MMMTransformer(make_config())
    ids = random_ids(4, 32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_last_only_gives_the_last_position_logits():
    cfg = model_config_from_preset("tiny", vocab_size=50, max_seq_len=32)
    model = MMMTransformer(cfg).eval()
    ids = torch.randint(0, 50, (2, 12))
    full = model(ids)
    cache = model.new_cache(2, 32)
    last = model(ids, cache, last_only=True)
    assert last.shape == (2, 1, 50)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


def test_rope_tables_made_in_inference_mode_still_train():
    model = MMMTransformer(model_config_from_preset("tiny", vocab_size=50, max_seq_len=32))
    ids = torch.randint(0, 50, (2, 12))
    with torch.inference_mode():
        model(ids)  # first use, e.g. a validation before training
    model(ids).sum().backward()
    assert model.embed_tokens.weight.grad is not None
