"""`python -m mmm.train_tokenizer data=<source> tokenizer.vocab_size=N`: learn BPE on the train
split of the source's token store (preprocessed first if missing) and write the tokenizer file
(`mmm.data.prepare.train_tokenizer`); see configs/tokenizer.yaml."""

from __future__ import annotations


def main() -> None:
    import hydra

    from mmm.data.prepare import train_tokenizer

    @hydra.main(config_path="../configs", config_name="tokenizer", version_base="1.3")
    def _run(cfg) -> None:
        print(train_tokenizer(cfg.data, cfg.tokenizer))

    _run()


if __name__ == "__main__":
    main()
