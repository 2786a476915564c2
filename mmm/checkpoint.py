"""`python -m mmm.checkpoint <.ckpt | DeepSpeed dir> <out folder>`: export a training checkpoint
to the `MMM.from_pretrained` folder format (`mmm.model.pretrained`)."""

from __future__ import annotations

from pathlib import Path

from mmm.model.pretrained import load_pretrained, save_pretrained


def main(argv: list[str] | None = None) -> None:
    """`python -m mmm.checkpoint <.ckpt | DeepSpeed dir> <out folder>`: export a training
    checkpoint to the `from_pretrained` folder format."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmm.checkpoint", description=main.__doc__)
    parser.add_argument("checkpoint", type=Path, help="Lightning .ckpt file or DeepSpeed checkpoint directory")
    parser.add_argument("out", type=Path, help="folder to write (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument(
        "--trusted",
        action="store_true",
        help="load a .ckpt holding more than plain data (this can run code from it: only for files you trust)",
    )
    args = parser.parse_args(argv)
    model, tokenizer = load_pretrained(args.checkpoint, trusted=args.trusted)
    print(save_pretrained(model, tokenizer, args.out, extra={"exported_from": str(args.checkpoint)}))


if __name__ == "__main__":
    main()
