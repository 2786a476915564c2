"""What only a CUDA GPU can check: flash-attn against SDPA in bf16, a bf16 training step and
KV-cache decoding on the GPU. Skipped without CUDA; experiments/gpu_check/run.sh runs them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmm.model import MMMTransformer, model_config_from_preset
from mmm.model.transformer import _load_flash_attn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
flash = pytest.mark.skipif(_load_flash_attn() is None, reason="needs flash-attn (pip install -e '.[gpu]')")


def base_pair(window: int | None = None) -> tuple[MMMTransformer, MMMTransformer]:
    """The `base` preset twice, same weights: attention by flash-attn, and by SDPA."""
    torch.manual_seed(0)
    configs = [
        model_config_from_preset("base", vocab_size=2000, max_seq_len=2048, attention=a, sliding_window=window)
        for a in ("flash", "sdpa")
    ]
    a = MMMTransformer(configs[0]).cuda()
    b = MMMTransformer(configs[1]).cuda()
    b.load_state_dict(a.state_dict())
    return a, b


@cuda
@flash
@pytest.mark.parametrize("window", [None, 256])
def test_flash_attention_matches_sdpa_in_bf16(window):
    a, b = base_pair(window)
    ids = torch.randint(0, 2000, (4, 1024), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert a._backend(ids.device, torch.bfloat16) == "flash" and b._backend(ids.device, torch.bfloat16) == "sdpa"
        la, lb = a(ids).float(), b(ids).float()
    # Both kernels round to bf16 differently; the logits agree to bf16 precision.
    torch.testing.assert_close(la, lb, rtol=2e-2, atol=2e-2)
    assert (la.argmax(-1) == lb.argmax(-1)).float().mean() > 0.99


@cuda
def test_bf16_training_step_on_cuda_lowers_the_loss():
    torch.manual_seed(0)
    model = MMMTransformer(model_config_from_preset("base", vocab_size=2000, max_seq_len=512)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, 2000, (8, 512), device="cuda")
    losses = []
    for _ in range(10):  # the same batch: the loss must fall
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@cuda
def test_kv_cache_decoding_on_cuda_matches_the_full_forward():
    a, _ = base_pair()
    ids = torch.randint(0, 2000, (2, 300), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        full = a(ids).float()
        cache = a.new_cache(batch_size=2, max_len=300, dtype=torch.bfloat16, device=ids.device)
        prefix = a(ids[:, :200], cache=cache).float()
        steps = [a(ids[:, t : t + 1], cache=cache).float() for t in range(200, 300)]
    decoded = torch.cat([prefix, *steps], dim=1)
    torch.testing.assert_close(decoded, full, rtol=2e-2, atol=2e-2)


def packed_vs_alone(model: MMMTransformer, device: str, lengths: list[int]) -> None:
    """Each sample's logits in a packed row equal those it gets alone in a padded row."""
    from mmm.data.datamodule import collate, pack

    torch.manual_seed(1)
    vocab = model.config.vocab_size
    batch = [
        {
            "input_ids": torch.randint(1, vocab, (n,)).numpy(),
            "labels": torch.zeros(n, dtype=torch.long).numpy(),
            "num_notes": 0,
            "index": i,
        }
        for i, n in enumerate(lengths)
    ]
    padded, packed = collate(batch, 0), pack(batch, 0)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        alone = model(padded["input_ids"].to(device)).float()
        together = model(packed["input_ids"].to(device), doc_ids=packed["doc_ids"].to(device)).float()[0]
    start = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # pack's order: longest first
        n = lengths[i]
        torch.testing.assert_close(together[start : start + n], alone[i, :n], rtol=2e-2, atol=2e-2)
        start += n


@cuda
@flash
@pytest.mark.parametrize("window", [None, 256])
def test_packed_rows_on_the_gpu_match_padded_rows(window):
    """Packed training rows (`data.loader.pack`, the default) take flash-attn's variable-length
    kernel on the GPU, and SDPA's block-diagonal mask without flash-attn."""
    for model in base_pair(window):
        packed_vs_alone(model, "cuda", [700, 300, 1000, 45])
