"""Packed training rows: several samples end to end in one row must train exactly like the same
samples each in its own padded row (same per-sample losses, same gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmm.data.datamodule import collate, pack
from mmm.data.sequences import IGNORE_INDEX
from mmm.model import MMMTransformer, ModelConfig, next_token_nll
from mmm.model.masks import packed_positions, varlen_offsets
from mmm.training.module import MMMLitModule

VOCAB = 50
PAD = 0


def samples(lengths, seed=0):
    """Random samples of the given lengths; the first third of each is an unscored prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(1, VOCAB, n)
        labels = ids.copy()
        labels[: n // 3] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels, "num_notes": int(n), "index": i})
    return out


def model(attention="sdpa", window=None):
    torch.manual_seed(0)
    return MMMTransformer(
        ModelConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=64,
            max_seq_len=64,
            attention=attention,
            sliding_window=window,
        )
    )


def per_sample_nll(m, batch, packed):
    """Summed NLL of each sample (by index), and the gradients of their total."""
    m.zero_grad()
    nll = next_token_nll(m, batch["input_ids"], batch["labels"], IGNORE_INDEX, doc_ids=batch.get("doc_ids"))
    nll.sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    if not packed:
        return nll.detach().sum(1).tolist(), grads
    # Packed: sum each row's NLL per sample; a target at position t belongs to doc_ids[t].
    docs = batch["doc_ids"][:, 1:]
    per_row = [[nll[r][docs[r] == d].sum().item() for d in range(int(docs[r].max()) + 1)] for r in range(len(nll))]
    return per_row, grads


def test_pack_layout():
    batch = samples([40, 10, 30, 20, 5, 64])
    out = pack(batch, PAD, row_len=64)
    ids, labels, docs = out["input_ids"], out["labels"], out["doc_ids"]
    assert ids.shape == (3, 64)  # 64 | 40+20 | 30+10+5 (first fit decreasing); not 6 padded rows
    found = []
    for r in range(len(ids)):
        for d in docs[r].unique().tolist():
            where = (docs[r] == d).nonzero().flatten()
            assert where.diff().eq(1).all()  # each sample is contiguous
            row_ids, row_labels = ids[r, where].numpy(), labels[r, where].numpy()
            match = [b for b in batch if len(b["input_ids"]) == len(where) and (b["input_ids"] == row_ids).all()]
            if not match:  # the padding at the row's end
                assert (row_ids == PAD).all() and (row_labels == IGNORE_INDEX).all()
                continue
            assert row_labels[0] == IGNORE_INDEX and (row_labels[1:] == match[0]["labels"][1:]).all()
            found.append(match[0]["index"])
    assert sorted(found) == list(range(6))
    assert out["index"].tolist() == list(range(6))
    with pytest.raises(ValueError, match="does not fit a packed row of 32"):
        pack(batch, PAD, row_len=32)


def test_positions_restart_per_sample():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert packed_positions(docs).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    packing = varlen_offsets(docs)  # flash-attn's layout of the flattened batch
    assert packing.offsets.tolist() == packing.bounds == [0, 3, 5, 6, 7, 12]
    assert packing.longest == 5 and packing.offsets.dtype == torch.int32


def test_pack_into_one_row_has_no_padding():
    batch = samples([40, 10, 30, 20, 5, 64])
    out = pack(batch, PAD)  # the training loader's layout (data.loader.pack=true)
    assert out["input_ids"].shape == (1, 169) and (out["input_ids"] != PAD).all()
    # Longest first (the order first-fit decreasing takes them in).
    assert out["doc_ids"].tolist() == [sum(([d] * n for d, n in enumerate([64, 40, 30, 20, 10, 5])), [])]
    assert out["labels"][0, [0, 64, 104, 134, 154, 164]].eq(IGNORE_INDEX).all()  # each sample's first


@pytest.mark.slow
@pytest.mark.parametrize("row_len", [None, 64])  # one row of everything; fixed rows of 64
@pytest.mark.parametrize("attention,window", [("sdpa", None), ("eager", None), ("sdpa", 8)])
def test_packed_batch_trains_like_padded(attention, window, row_len):
    batch = samples([40, 10, 30, 20, 5, 64, 17], seed=1)
    m = model(attention, window)
    padded, grads_padded = per_sample_nll(m, collate(batch, PAD), packed=False)
    packed_batch = pack(batch, PAD, row_len=row_len)
    per_row, grads_packed = per_sample_nll(m, packed_batch, packed=True)
    # Map each packed sample back to its index through its length and first ids.
    packed = {}
    for r, row in enumerate(per_row):
        for d, value in enumerate(row):
            where = (packed_batch["doc_ids"][r] == d).nonzero().flatten()
            ids = packed_batch["input_ids"][r, where].numpy()
            for b in batch:
                if len(b["input_ids"]) == len(ids) and (b["input_ids"] == ids).all():
                    packed[b["index"]] = value
    assert sorted(packed) == list(range(len(batch)))
    np.testing.assert_allclose([packed[i] for i in range(len(batch))], padded, rtol=1e-4, atol=1e-4)
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_unmasked_packing_would_differ():
    """The equivalence above is not vacuous: the same rows without doc_ids (attention across
    samples, positions running on) give other losses."""
    batch = samples([40, 10, 30, 20], seed=2)
    m = model()
    packed_batch = pack(batch, PAD, row_len=64)
    with torch.no_grad():
        right = next_token_nll(
            m, packed_batch["input_ids"], packed_batch["labels"], IGNORE_INDEX, doc_ids=packed_batch["doc_ids"]
        )
        wrong = next_token_nll(m, packed_batch["input_ids"], packed_batch["labels"], IGNORE_INDEX)
    assert not torch.allclose(right, wrong, atol=1e-3)


@pytest.mark.slow
def test_compiled_loss_matches_eager():
    """`compile=True` runs torch.compile on the loss: same value and gradients as eager."""
    config = model().config.to_dict()
    optim = {
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "min_lr_ratio": 0.1,
    }
    eager, compiled = MMMLitModule(config, optim), MMMLitModule(config, optim, compile=True)
    compiled.model.load_state_dict(eager.model.state_dict())
    assert "compile" not in compiled.hparams  # not saved in checkpoints
    batch = pack(samples([40, 10, 30, 20, 5], seed=3), PAD)
    results = []
    for module in (eager, compiled):
        nll, count = module._nll(batch)
        nll.backward()
        results.append((nll.detach(), count, [p.grad for p in module.model.parameters()]))
    (a, count_a, grads_a), (b, count_b, grads_b) = results
    assert count_a == count_b
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-5)
