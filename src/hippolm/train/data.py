"""Training data for distillation: local text / JSON lines / Parquet files, tokenised and packed.

Every document (a ``.txt`` file, or one row of a ``.jsonl``/``.parquet`` file with a ``"text"``
string or chat ``"messages"``) is tokenised once (through ``datasets``, cached on disk), followed
by the tokenizer's end-of-sequence token, and all documents are laid end to end in one token
stream. Block ``i`` of the packed data is tokens ``[i * seq_len, (i + 1) * seq_len)`` of that
stream: short documents share a block, long ones are split over several. Only the document lengths
are held in memory; a block is read from the on-disk Arrow table when it is used.

The order blocks are visited in is a pure function of the seed and of the position in the
stream of samples (:class:`SampleOrder`), so a run restarted from a checkpoint that recorded that
position continues with exactly the samples it would have seen.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """Bad training data: a clear message for the user."""


def resolve_files(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files, globs and folders (searched recursively for supported files), in sorted order."""
    if not patterns:
        raise DataError("no data given: pass --data with .txt, .jsonl or .parquet files, globs or folders.")
    supported = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
    files: list[Path] = []
    for pattern in patterns:
        p = Path(pattern).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in supported)
            if not found:
                raise DataError(f"data folder {p} holds no {', '.join(supported)} files.")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"data file not found: {pattern} (no file, folder or glob match).")
            files += matches
    for f in files:
        if f.suffix.lower() not in supported:
            raise DataError(f"{f}: unsupported data file type {f.suffix!r}; use {', '.join(supported)}.")
    seen: set[Path] = set()
    return [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]


def _fingerprint(files: Sequence[Path], tokenizer, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str(tokenizer.eos_token_id).encode() + str(tokenizer.bos_token_id).encode())
    return h.hexdigest()[:32]


def _load_raw(files: Sequence[Path], cache_dir: str | None):
    """One ``datasets`` table per file type, each row a document."""
    import datasets

    groups: dict[str, list[str]] = {}
    for f in files:
        s = f.suffix.lower()
        kind = "text" if s in TEXT_SUFFIXES else "json" if s in JSON_SUFFIXES else "parquet"
        groups.setdefault(kind, []).append(str(f))
    tables = []
    for kind, paths in groups.items():
        extra = {"sample_by": "document"} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=paths, split="train", cache_dir=cache_dir, **extra)
        except Exception as e:  # malformed JSON, mixed schemas, unreadable Parquet, ...
            raise DataError(f"could not read the {kind} data files ({', '.join(paths[:3])}"
                            f"{' ...' if len(paths) > 3 else ''}): {type(e).__name__}: {e}") from e
        if kind != "text" and not ({"text", "messages"} & set(ds.column_names)):
            raise DataError(f"{kind} data ({paths[0]} ...) has columns {ds.column_names}; each row needs a "
                            "'text' string or chat 'messages' (a list of {role, content}).")
        tables.append(ds.select_columns([c for c in ("text", "messages") if c in ds.column_names]))
    return tables


def _tokenize_fn(tokenizer, add_eos: bool):
    eos = tokenizer.eos_token_id

    def fn(batch):
        n = len(next(iter(batch.values())))
        texts = batch.get("text", [None] * n)
        messages = batch.get("messages", [None] * n)
        out = []
        for text, msgs in zip(texts, messages, strict=True):
            if msgs:
                rendered = tokenizer.apply_chat_template(msgs, tokenize=False)
                ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
            elif text:
                ids = tokenizer(text)["input_ids"]
            else:
                ids = []
            if ids and add_eos and eos is not None and ids[-1] != eos:
                ids = [*ids, eos]
            out.append(ids)
        return {"input_ids": out, "length": [len(x) for x in out]}

    return fn


class PackedTokens:
    """The documents of ``files`` as one token stream cut into blocks of ``seq_len`` tokens."""

    def __init__(self, files: Sequence[str | os.PathLike], tokenizer, seq_len: int, *, cache_dir: str | None = None,
                 min_doc_tokens: int = 0, num_proc: int | None = None):
        import datasets

        self.files = resolve_files(files)
        self.seq_len = int(seq_len)
        for f in self.files:
            if f.stat().st_size == 0:
                raise DataError(f"data file {f} is empty.")
        tables = _load_raw(self.files, cache_dir)
        fp = _fingerprint(self.files, tokenizer, f"v1|eos|{min_doc_tokens}")
        if any("messages" in t.column_names for t in tables) and not getattr(tokenizer, "chat_template", None):
            raise DataError("the data has chat 'messages' but the tokenizer has no chat template; pass rows "
                            "with 'text' instead, or a base whose tokenizer has a chat template.")
        tokenized = []
        for i, table in enumerate(tables):
            tok = table.map(_tokenize_fn(tokenizer, add_eos=True), batched=True, batch_size=64,
                            remove_columns=table.column_names, new_fingerprint=f"hippolm-tok-{fp}-{i}",
                            num_proc=num_proc, desc="Tokenising")
            if min_doc_tokens:
                tok = tok.filter(lambda n: n >= min_doc_tokens, input_columns="length",
                                 new_fingerprint=f"hippolm-min-{fp}-{i}")
            tokenized.append(tok)
        self.docs = datasets.concatenate_datasets(tokenized) if len(tokenized) > 1 else tokenized[0]
        self.docs = self.docs.with_format("numpy")
        lengths = np.asarray(self.docs["length"], dtype=np.int64) if len(self.docs) else np.zeros(0, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.total_tokens = int(self.offsets[-1])
        self.num_documents = int((lengths > 0).sum())
        if self.total_tokens < self.seq_len:
            where = ", ".join(str(f) for f in self.files[:3]) + (" ..." if len(self.files) > 3 else "")
            raise DataError(f"the data ({where}) holds {self.total_tokens} tokens in {self.num_documents} "
                            f"documents, fewer than one sequence of --seq-len {self.seq_len}.")
        self.fingerprint = fp

    def __len__(self) -> int:
        return self.total_tokens // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start, end = i * self.seq_len, (i + 1) * self.seq_len
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, end, side="left"))  # exclusive
        parts = self.docs[first:last]["input_ids"]
        parts = [np.asarray(p, dtype=np.int64) for p in parts]
        flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        lo = start - int(self.offsets[first])
        block = flat[lo : lo + self.seq_len]
        assert block.shape[0] == self.seq_len
        return torch.from_numpy(block.copy())

    def describe(self) -> dict:
        return {"files": [str(f) for f in self.files], "documents": self.num_documents,
                "tokens": self.total_tokens, "seq_len": self.seq_len, "blocks": len(self),
                "fingerprint": self.fingerprint}


class SampleOrder:
    """Which block is sample ``q`` of the infinite, shuffled stream: epoch ``q // n`` is a
    permutation of the ``n`` blocks drawn from (seed, epoch) alone."""

    def __init__(self, num_blocks: int, seed: int):
        self.n, self.seed = int(num_blocks), int(seed)
        self._epoch, self._perm = -1, None

    def __getitem__(self, q: int) -> int:
        epoch, i = divmod(int(q), self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[i])

    def epoch(self, q: int) -> float:
        return q / self.n


def rank_batch(data: PackedTokens, order: SampleOrder, position: int, micro: int, rank: int, world: int,
               batch_size: int) -> torch.Tensor:
    """The ``[batch_size, seq_len]`` token ids of micro-batch ``micro`` of ``rank`` in the step whose
    first sample is ``position`` of the stream: the global step is split into micro-batches, each
    micro-batch into one contiguous shard of ``batch_size`` samples per rank."""
    first = position + (micro * world + rank) * batch_size
    return torch.stack([data[order[q]] for q in range(first, first + batch_size)])
