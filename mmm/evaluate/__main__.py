"""`python -m mmm.evaluate key=value ...` (Hydra, `configs/evaluate.yaml`): see `mmm.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from mmm.evaluate import REPORT_FILE, evaluate


def main() -> None:
    import hydra

    @hydra.main(config_path="../../configs", config_name="evaluate", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        metrics = evaluate(cfg)
        lik = metrics["likelihood"]
        print(
            json.dumps(
                {
                    name: {k: lik[name][k] for k in ("bits_per_token", "bits_per_note")}
                    for name in ("model", "bigram", "unigram")
                }
            )
        )
        print(json.dumps({k: v for k, v in metrics["structure"]["all"].items()}))
        print(f"report: {Path(cfg.out_dir) / REPORT_FILE}")

    _run()


if __name__ == "__main__":
    main()
