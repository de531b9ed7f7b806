"""Prompt datasets in verl's schema, their tokenization, and a resumable prompt sampler.

One record per prompt, as verl's data preparation writes it::

    {"data_source": "gsm8k",
     "prompt": [{"role": "user", "content": "..."}],      # or a plain string
     "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": "72"},
     "extra_info": {"split": "train", "index": 0}}

Files are ``.jsonl`` (one JSON object per line; blank lines ignored), ``.json`` (a JSON array
of records, or JSON lines) or ``.parquet``. Every problem is a :class:`DataError` naming the
file and the 1-based line (row for parquet).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from icpo.data.templates import Prompt, build_prompt, to_messages


class DataError(ValueError):
    """A malformed or unusable record; the message starts with ``file:line``."""


@dataclass
class PromptRecord:
    """One prompt of a dataset."""

    prompt: Prompt
    """Chat messages ``[{"role", "content"}]`` or plain text, as stored (no template yet)."""
    ground_truth: str
    """Reference answer given to the reward function."""
    data_source: str
    """Dataset name passed to the reward function (file stem when the record has none)."""
    extra_info: dict = field(default_factory=dict)
    """Free-form record metadata, passed to the reward function."""
    index: int = 0
    """0-based position of the record in its file."""
    location: str = ""
    """``file:line`` of the record, for error messages."""


@dataclass
class PromptItem:
    """A tokenized prompt: ``prompt_ids`` plus the text and record they came from."""

    prompt_ids: list[int]
    """Token ids of the templated prompt (no special tokens added by the tokenizer call)."""
    prompt_text: str
    """The templated prompt text."""
    record: PromptRecord
    """The source record."""


def _lookup(record: dict, dotted: str) -> Any:
    """``record["a"]["b"]`` for ``"a.b"``; KeyError naming the first missing part."""
    obj: Any = record
    for i, key in enumerate(dotted.split(".")):
        if not isinstance(obj, dict) or key not in obj or obj[key] is None:
            raise KeyError(".".join(dotted.split(".")[: i + 1]))
        obj = obj[key]
    return obj


def _to_record(raw: Any, where: str, index: int, stem: str, prompt_key: str,
               answer_key: str) -> PromptRecord:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object (record), got {type(raw).__name__}")
    try:
        prompt = _lookup(raw, prompt_key)
    except KeyError as e:
        raise DataError(f"{where}: record has no prompt (missing key {e.args[0]!r})") from None
    try:
        answer = _lookup(raw, answer_key)
    except KeyError as e:
        raise DataError(
            f"{where}: record has no ground truth (missing key {e.args[0]!r})") from None
    try:
        to_messages(prompt, "none")
    except TypeError as e:
        raise DataError(f"{where}: bad {prompt_key!r}: {e}") from None
    if isinstance(prompt, str) and not prompt.strip():
        raise DataError(f"{where}: {prompt_key!r} is an empty string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: {answer_key!r} must be a string or a number, "
                        f"got {type(answer).__name__}")
    data_source = raw.get("data_source", stem)
    extra_info = raw.get("extra_info") or {}
    if not isinstance(data_source, str) or not isinstance(extra_info, dict):
        raise DataError(f"{where}: 'data_source' must be a string and 'extra_info' a mapping")
    if isinstance(prompt, list):
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return PromptRecord(prompt, str(answer), data_source, dict(extra_info), index, where)


def _decode(raw: bytes, path: str, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start + 1})") from None


def _read_text(path: str) -> str:
    """The whole file as text; a byte that is not UTF-8 is an error naming its line."""
    with open(path, "rb") as f:
        return "".join(_decode(raw, path, n) for n, raw in enumerate(f, start=1))


def _iter_json_lines(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:  # decoded line by line so a bad byte is reported with its line
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _iter_raw(path: str) -> Iterator[tuple[str, Any]]:
    """(location, raw record) for each record of ``path``."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 (pyarrow raises several types for bad files)
            raise DataError(f"{path}: cannot read parquet ({e})") from None
        for i, row in enumerate(rows, start=1):
            yield f"{path}:row {i}", row
    elif ext == ".json" and _first_char(path) == "[":
        try:
            rows = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, row in enumerate(rows, start=1):
            yield f"{path}:record {i}", row
    elif ext in (".jsonl", ".json"):
        for lineno, row in _iter_json_lines(path):
            yield f"{path}:{lineno}", row
    else:
        raise DataError(
            f"{path}: unsupported file type {ext!r}; expected .jsonl, .json or .parquet")


def _first_char(path: str) -> str:
    with open(path, "rb") as f:
        while ch := f.read(1):
            if not ch.isspace():
                return ch.decode("latin-1")  # only compared with "["
    return ""


def load_records(path: str | os.PathLike, *, prompt_key: str = "prompt",
                 answer_key: str = "reward_model.ground_truth") -> list[PromptRecord]:
    """Every record of a .jsonl/.json/.parquet file in verl's schema.

    ``prompt_key``/``answer_key`` are dotted paths into each record. Raises FileNotFoundError
    naming the path, or DataError naming file and line for a malformed or incomplete record.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path!r}")
    stem = os.path.splitext(os.path.basename(path))[0]
    records = [_to_record(raw, where, i, stem, prompt_key, answer_key)
               for i, (where, raw) in enumerate(_iter_raw(path))]
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_files(paths: list[str], data_cfg: Any) -> list[PromptRecord]:
    """Records of several files in order, with ``data_cfg.prompt_key``/``answer_key``."""
    if not paths:
        raise DataError("no data files given (data.train_files / data.val_files is empty)")
    out: list[PromptRecord] = []
    for p in paths:
        out.extend(load_records(p, prompt_key=data_cfg.prompt_key, answer_key=data_cfg.answer_key))
    return out


class PromptDataset:
    """Records templated and tokenized once; ``items[i].prompt_ids`` is what the rollout gets.

    Prompts longer than ``data_cfg.max_prompt_length`` tokens are skipped and counted in
    ``num_skipped`` (``overlong_prompts="skip"``) or raise DataError naming the record
    (``"error"``). Uses ``data_cfg.template`` and ``data_cfg.max_prompt_length``.
    """

    def __init__(self, records: list[PromptRecord], tokenizer: Any, data_cfg: Any,
                 chunk_size: int = 1024) -> None:
        if not records:
            raise DataError("records: got an empty list; expected at least one prompt")
        self.items: list[PromptItem] = []
        self.num_skipped = 0
        limit = data_cfg.max_prompt_length
        for start in range(0, len(records), chunk_size):
            chunk = records[start:start + chunk_size]
            texts = [self._text(tokenizer, r, data_cfg.template) for r in chunk]
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            for rec, text, toks in zip(chunk, texts, ids):
                toks = list(toks)
                if not toks:
                    raise DataError(f"{rec.location}: prompt tokenizes to no tokens")
                if len(toks) > limit:
                    if data_cfg.overlong_prompts == "error":
                        raise DataError(f"{rec.location}: prompt has {len(toks)} tokens, more than "
                                        f"data.max_prompt_length={limit}")
                    self.num_skipped += 1
                    continue
                self.items.append(PromptItem(toks, text, rec))
        if not self.items:
            raise DataError(f"all {len(records)} prompts are longer than "
                            f"data.max_prompt_length={limit} tokens")

    @staticmethod
    def _text(tokenizer: Any, rec: PromptRecord, template: str) -> str:
        try:
            return build_prompt(tokenizer, rec.prompt, template)
        except Exception as e:  # chat templates raise on e.g. bad role order
            raise DataError(f"{rec.location}: cannot apply the prompt template ({e})") from e

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> PromptItem:
        return self.items[i]


class PromptSampler:
    """Endless batches of item indices, epoch after epoch, deterministic per seed.

    Epoch ``e`` visits every index once, in an order fixed by ``(seed, e)`` (or in order when
    ``shuffle`` is False). A batch that reaches the end of an epoch continues into the next, so
    no prompt is dropped. ``state_dict()`` is ``(epoch, position)``: loading it resumes the exact
    sequence of batches.
    """

    def __init__(self, num_items: int, batch_size: int, shuffle: bool = True,
                 seed: int = 0) -> None:
        if not isinstance(num_items, int) or num_items < 1:
            raise ValueError(f"num_items: got {num_items!r}; expected an int >= 1")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size!r}; expected an int >= 1")
        self.num_items, self.batch_size = num_items, batch_size
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        g = torch.Generator()
        # Mix seed and epoch so that (seed, epoch + 1) and (seed + 1, epoch) differ.
        g.manual_seed((self.seed * 0x9E3779B97F4A7C15 + epoch) % (1 << 63))
        return torch.randperm(self.num_items, generator=g).tolist()

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` indices in ``[0, num_items)``."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            take = min(self.batch_size - len(batch), self.num_items - self.position)
            batch.extend(self._order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int | bool]:
        """Position in the stream plus the settings it is only valid for."""
        return {"epoch": self.epoch, "position": self.position, "num_items": self.num_items,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the dataset size, shuffle and seed must match."""
        for key in ("num_items", "shuffle", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state {key}={state[key]!r} does not match this "
                                 f"sampler's {key}={getattr(self, key)!r}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_items:
            raise ValueError(f"sampler state: epoch={epoch}, position={position} out of range "
                             f"for num_items={self.num_items}")
        self.epoch, self.position = epoch, position
        self._order = self._epoch_order(epoch)
