"""Training tokens/s and MFU of the `base` model on one CUDA GPU, bf16 autocast, with flash-attn
and with PyTorch SDPA (same weights), and the two kernels' logits compared.

    python experiments/gpu_check/bench.py --out runs/gpu_check/bench.json

Synthetic token batches of the `+experiment=gigamidi` shape (16 x 2048, vocabulary 16,000): the
model's speed, not the loader's. MFU follows PaLM (Chowdhery et al. 2022, appendix B): model
FLOPs per token 6 N + 12 L d T (N: parameters without the input embedding, L layers, d hidden
size, T context), over the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmm.model import MMMTransformer, model_config_from_preset
from mmm.model.transformer import _load_flash_attn

# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s, without sparsity).
PEAK_BF16 = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,
    "H100 80GB HBM3": 989.4e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def flops_per_token(model: MMMTransformer, T: int) -> float:
    c = model.config
    n = model.num_parameters() - model.embed_tokens.weight.numel()
    return 6 * n + 12 * c.num_layers * c.hidden_size * T


def bench(model: MMMTransformer, ids: torch.Tensor, steps: int, warmup: int) -> float:
    """Tokens/s of full training steps (forward, backward, fused AdamW)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return steps * ids[:, :-1].numel() / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark measures GPU training")
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name)
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device="cuda")
    result = {
        "gpu": name,
        "torch": torch.__version__,
        "batch": args.batch,
        "seq": args.seq,
        "vocab": args.vocab,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "flash_attn_installed": _load_flash_attn() is not None,
    }
    weights = None
    logits = {}
    for attention in ("flash", "sdpa"):
        if attention == "flash" and _load_flash_attn() is None:
            continue
        config = model_config_from_preset("base", vocab_size=args.vocab, max_seq_len=args.seq, attention=attention)
        model = MMMTransformer(config).cuda()
        if weights is None:
            weights = {k: v.clone() for k, v in model.state_dict().items()}
            result["parameters"] = model.num_parameters()
        model.load_state_dict(weights)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits[attention] = model(ids[:4, :1024]).float()
        torch.cuda.reset_peak_memory_stats()
        tps = bench(model, ids, args.steps, args.warmup)
        mfu = tps * flops_per_token(model, args.seq) / peak if peak else None
        result[attention] = {
            "tokens_per_s": round(tps),
            "mfu": round(mfu, 4) if mfu else None,
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        }
        print(attention, result[attention], flush=True)
        del model
    if len(logits) == 2:
        diff = (logits["flash"] - logits["sdpa"]).abs()
        result["logits_flash_vs_sdpa"] = {
            "max_abs_diff": diff.max().item(),
            "mean_abs_diff": diff.mean().item(),
            "argmax_agreement": (logits["flash"].argmax(-1) == logits["sdpa"].argmax(-1)).float().mean().item(),
            "within_tolerance": bool(torch.allclose(logits["flash"], logits["sdpa"], rtol=2e-2, atol=2e-2)),
        }
        print("logits", result["logits_flash_vs_sdpa"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
