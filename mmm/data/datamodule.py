"""The MIDI LightningDataModule: token store -> training sequences built on the fly."""

from __future__ import annotations

import multiprocessing
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmm.config import at_least, check_section
from mmm.data.sequences import IGNORE_INDEX, SequenceBuilder, SequenceConfig
from mmm.data.store import Store, check_vocab
from mmm.data.store_writer import PreprocessConfig, SplitConfig
from mmm.data.timing import sequence_timing
from mmm.tokenizer import Vocab, load_tokenizer


@dataclass(frozen=True)
class LoaderConfig:
    """`data.loader`: torch DataLoader settings."""

    batch_size: int = field(metadata=at_least(1))
    num_workers: int = field(metadata=at_least(0))
    pin_memory: bool = False
    # The batch's samples end to end in one row (`pack`) instead of one padded row each: no
    # compute on padding; attention stays within each sample.
    pack: bool = True
    # How loader workers start. A worker forked from the training process inherits its whole
    # heap, and every page the trainer then rewrites becomes the worker's own copy: each worker
    # comes to hold as much memory as the trainer had when the epoch began (experiments/memory).
    # "forkserver" forks them from a server process that is a new interpreter, not a copy of it.
    start_method: Literal["forkserver", "spawn", "fork"] = "forkserver"


@dataclass(frozen=True)
class DataConfig:
    """The `data` section (configs/data/common.yaml + one source file): where the corpus comes
    from, how it is preprocessed into a store, and how training samples are drawn from it."""

    name: str  # the folder under paths.data_dir holding this source's store and tokenizer
    dir: str
    store: str
    source: dict  # checked by `mmm.data.sources.build_source` (each source has its own keys)
    split: SplitConfig
    preprocess: PreprocessConfig
    samples_per_epoch: int | None = field(metadata=at_least(1))
    max_seq_len: int = field(metadata=at_least(16))
    sequences: SequenceConfig
    loader: LoaderConfig
    path: str | None = None  # data=folder's input folder (also in source.path)


class SequenceDataset(Dataset):
    """Item i of epoch e is a sample of chunk i drawn with a seed of (seed, e, i): runs are
    reproducible, every epoch sees new samples, and a resumed run draws what it would have.

    `fill_program`, `target_last` and `timing` follow the model (`ModelConfig`'s fields, `.timing`): with
    `timing`, each item also carries its ids' musical times and target flags."""

    def __init__(
        self,
        store_path: str | Path,
        split: str,
        tokenizer_path: str | Path,
        sequences: SequenceConfig,
        max_seq_len: int,
        seed: int,
        vary_per_epoch: bool,
        length: int | None = None,
        fill_program: bool = False,
        target_last: bool = False,
        timing: str | None = None,
    ) -> None:
        self.fill_program, self.target_last, self.timing = fill_program, target_last, timing
        self.store_path, self.split = Path(store_path), split
        self.tokenizer_path = Path(tokenizer_path)
        self.sequences, self.max_seq_len = sequences, max_seq_len
        self.seed, self.vary_per_epoch = seed, vary_per_epoch
        self.epoch = 0
        self._store: Store | None = None
        self._builder: SequenceBuilder | None = None
        self._chunks = len(Store(self.store_path, split))
        # An epoch may be longer than the store (small corpora): chunks are then revisited,
        # each time with other random choices.
        self._length = length if length and self._chunks else self._chunks

    def _open(self) -> None:
        # Opened lazily so that each loader worker memory-maps the store itself.
        vocab = Vocab(load_tokenizer(self.tokenizer_path))
        self._builder = SequenceBuilder(vocab, self.sequences, self.max_seq_len, self.fill_program, self.target_last)
        self._store = Store(self.store_path, self.split)

    def __getstate__(self) -> dict:
        # A worker started by forkserver or spawn receives the dataset pickled: without the opened
        # store (its memory-mapped tables would be copied whole), which the worker opens itself.
        return {**self.__dict__, "_store": None, "_builder": None}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._builder is None:
            self._open()
        epoch = self.epoch if self.vary_per_epoch else 0
        rng = random.Random(f"{self.seed}-{epoch}-{i}")
        ids, labels = self._builder(self._store[i % self._chunks], rng)
        vocab = self._builder.vocab
        notes = int(vocab.notes_per_model_id[ids[labels != IGNORE_INDEX]].sum())
        item = {"input_ids": ids, "labels": labels, "num_notes": notes, "index": i}
        if self.timing is not None:
            item["times"], item["flags"], _ = sequence_timing(ids, vocab, self.timing)
        return item


def _token_fields(batch: list[dict[str, Any]], pad_id: int) -> dict[str, int]:
    """The per-token arrays of the samples and what fills their padding."""
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "times": 0, "flags": 0}
    return {k: v for k, v in fills.items() if k in batch[0]}


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: causal attention never looks at the padding."""
    length = max(len(b["input_ids"]) for b in batch)
    out = {}
    for key, fill in _token_fields(batch, pad_id).items():
        array = np.full((len(batch), length), fill, dtype=np.int64)
        for row, b in enumerate(batch):
            array[row, : len(b[key])] = b[key]
        out[key] = torch.from_numpy(array)
    return {
        **out,
        "num_notes": torch.tensor([b["num_notes"] for b in batch]),
        "index": torch.tensor([b["index"] for b in batch]),  # which samples (rank split, resume checks)
    }


def pack(batch: list[dict[str, Any]], pad_id: int, row_len: int | None = None) -> dict[str, torch.Tensor]:
    """Pack the samples end to end: by default into one row exactly as long as all of them (no
    padding at all); with `row_len`, into as few rows of `row_len` ids as first-fit decreasing
    finds (fixed shapes, at the cost of padding at the rows' ends: samples of 500-1,000 ids
    rarely share a row of 1,024). `doc_ids` numbers the samples of each row (the padding at a
    row's end is a sample of its own) so that the model restarts positions and keeps attention
    within each sample. Musical times and target flags, when the samples have them, travel with
    their ids (they are the sample's own: nothing to restart).

    A sample's first label is ignored: unpacked, position 0 is never a target; packed, it would
    be the previous sample's last token predicting it. Per-sample losses are therefore exactly
    those of `collate`'s padded rows."""
    lengths = [len(b["input_ids"]) for b in batch]
    row_len = sum(lengths) if row_len is None else row_len
    if max(lengths) > row_len:
        raise ValueError(
            f"a sample of {max(lengths)} ids does not fit a packed row of {row_len}: "
            "data.max_seq_len must bound the samples"
        )
    rows: list[list[int]] = []  # sample indices per row
    free: list[int] = []
    for i in sorted(range(len(batch)), key=lambda i: -lengths[i]):
        row = next((r for r, space in enumerate(free) if space >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(row_len)
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    fields = _token_fields(batch, pad_id)
    arrays = {key: np.full((len(rows), row_len), fill, dtype=np.int64) for key, fill in fields.items()}
    docs = np.empty((len(rows), row_len), dtype=np.int64)
    for r, members in enumerate(rows):
        at = 0
        for doc, i in enumerate(members):
            end = at + lengths[i]
            for key, array in arrays.items():
                array[r, at:end] = batch[i][key]
            arrays["labels"][r, at] = IGNORE_INDEX
            docs[r, at:end] = doc
            at = end
        docs[r, at:] = len(members)
    return {
        **{key: torch.from_numpy(array) for key, array in arrays.items()},
        "doc_ids": torch.from_numpy(docs),
        "num_notes": torch.tensor([b["num_notes"] for b in batch]),
        "index": torch.tensor([b["index"] for b in batch]),
    }


class ResumableSampler(Sampler[int]):
    """Random order fixed by (seed, epoch), split across ranks, able to start mid-epoch: a
    resumed run sees the rest of the interrupted epoch, not the epoch again from its start.

    Each sample index of the epoch goes to exactly one rank. Ranks must take as many steps, so
    an epoch of N samples is rounded up to a multiple of the world size with the indices
    N, N+1...: `SequenceDataset` draws those from chunks again with their own random choices,
    so they are new samples, not repeats (torch's DistributedSampler repeats samples instead)."""

    def __init__(
        self, num_samples: int, seed: int, epoch: int, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        per_rank = -(-num_samples // world_size)
        order = torch.randperm(per_rank * world_size, generator=generator).tolist()
        mine = order[rank::world_size]
        # The epoch's remaining samples come first. The loader keeps its full length because
        # Lightning counts the batches of a resumed epoch itself and stops it at that length.
        self.indices = mine[start:] + mine[:start]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _Collate:
    def __init__(self, pad_id: int, packed: bool) -> None:
        self.pad_id, self.packed = pad_id, packed

    def __call__(self, batch):
        return pack(batch, self.pad_id) if self.packed else collate(batch, self.pad_id)


def _worker_context(start_method: str) -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        # The server imports what a worker runs (torch, the tokenizer, the store) once; workers
        # forked from it share those pages instead of importing them each (set before it starts).
        context.set_forkserver_preload([__name__])
    return context


class MIDIDataModule(L.LightningDataModule):
    """Train/valid/test loaders over a preprocessed store (see `mmm.preprocess`), sequences in
    the format the model reads (`fill_program`, `target_last`, `timing`: see `SequenceDataset`)."""

    def __init__(
        self,
        *,
        store: str,
        max_seq_len: int,
        sequences: SequenceConfig | Any,
        loader: LoaderConfig | Any,
        tokenizer_path: str,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        fill_program: bool = False,
        target_last: bool = False,
        timing: str | None = None,
    ) -> None:
        super().__init__()
        self.fill_program, self.target_last, self.timing = fill_program, target_last, timing
        self.store = store
        self.max_seq_len = max_seq_len
        self.sequences = check_section("data.sequences", sequences, SequenceConfig)
        self.loader = check_section("data.loader", loader, LoaderConfig)
        self.tokenizer_path = tokenizer_path
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        tokenizer = load_tokenizer(tokenizer_path)
        check_vocab(store, tokenizer, tokenizer_path)  # a store tokenized otherwise decodes as nonsense
        self.pad_id = Vocab(tokenizer).pad
        self.datasets: dict[str, SequenceDataset] = {}
        self._resume: dict[str, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "valid", "test"):
            if split not in self.datasets:
                self.datasets[split] = SequenceDataset(
                    self.store,
                    split,
                    self.tokenizer_path,
                    self.sequences,
                    self.max_seq_len,
                    seed=self.seed,
                    vary_per_epoch=split == "train",
                    length=self.samples_per_epoch if split == "train" else None,
                    fill_program=self.fill_program,
                    target_last=self.target_last,
                    timing=self.timing,
                )
        if len(self.datasets["train"]) == 0:
            raise ValueError(f"the train split of {self.store} is empty: nothing to train on")

    @classmethod
    def from_config(
        cls,
        data: DataConfig,
        tokenizer_path: str,
        seed: int,
        fill_program: bool = False,
        target_last: bool = False,
        timing: str | None = None,
    ) -> MIDIDataModule:
        return cls(
            fill_program=fill_program,
            target_last=target_last,
            timing=timing,
            store=data.store,
            max_seq_len=data.max_seq_len,
            sequences=data.sequences,
            loader=data.loader,
            tokenizer_path=tokenizer_path,
            samples_per_epoch=data.samples_per_epoch,
            seed=seed,
        )

    def _loader(self, split: str, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.loader.batch_size,
            sampler=sampler,
            num_workers=self.loader.num_workers,
            collate_fn=_Collate(self.pad_id, self.loader.pack),
            pin_memory=self.loader.pin_memory,
            persistent_workers=False,
            drop_last=False,
            multiprocessing_context=_worker_context(self.loader.start_method) if self.loader.num_workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        # Called at every epoch (reload_dataloaders_every_n_epochs=1): loader workers copy the
        # dataset, so the epoch is set on it before the loader is made.
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        start = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            start = self._resume["samples_done"]
        self._resume = None
        dataset = self.datasets["train"]
        dataset.set_epoch(epoch)
        sampler = ResumableSampler(
            len(dataset),
            self.seed,
            epoch,
            start,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def state_dict(self) -> dict[str, int]:
        """Saved in every checkpoint: where in the epoch the training loader stands."""
        trainer = self.trainer
        if trainer is None:
            return {}
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "samples_done": done * self.loader.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state) if state else None
