"""`python -m mmm.preprocess data=<source>`: music files -> token store (`mmm.data.store_writer`).

Filters unreadable and unsuitable files (each reported with its reason), chunks pieces on bar
boundaries and stores base token ids per track and bar. A piece's split is the one its source
gives (GigaMIDI's train/validation/test files) or else a hash of its *tokenized* content, so the
same music under two file names always lands in one split; such exact duplicates are kept once
and reported.

Work is done in shards of files by worker processes watched from outside: a file that hangs (even
inside C code) past `file_timeout` gets its worker killed, a file that kills its worker (segfault,
abort, out of memory) is reported with the signal, and the rest of the run goes on. A shard is
written atomically, so an interrupted run resumes where it stopped. The shards can be shared out
between the tasks of a job array (`task_index`/`task_count`, or Slurm's array variables) and between
the tasks of one `srun` step (`srun -n 4 python -m mmm.preprocess`: SLURM_PROCID of
SLURM_STEP_NUM_TASKS): each task locks only the shards it works on, and the store is complete
(`report.json`) once every shard is done, byte for byte the store a single run writes.
"""

from __future__ import annotations


def main() -> None:
    import hydra

    from mmm.data.store_writer import array_task, preprocess

    @hydra.main(config_path="../configs", config_name="preprocess", version_base="1.3")
    def _run(cfg) -> None:
        preprocess(cfg.data, cfg.tokenizer, task=array_task(cfg.task_index, cfg.task_count))

    _run()


if __name__ == "__main__":
    main()
