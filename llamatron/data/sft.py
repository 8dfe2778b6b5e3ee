"""Supervised fine-tuning data: JSONL examples tokenized once into a cache, then served as padded or
packed sequences with the prompt tokens' labels masked (-100).

One example per line, in any of these layouts (detected per line):
  - {"prompt", "completion"} (or "response"): a prompt/response pair;
  - {"instruction", "input", "output"}: alpaca, rendered with the alpaca prompt;
  - {"messages": [{"role", "content"}, ...]}: a conversation, rendered with the chat template
    (`llamatron/data/chat_templates.py`), the assistant turns trained;
  - {"passage", "question", "label"}: BoolQ, Pax's prompt `{passage}\\nquestion: {question}?\\nanswer:`
    and the target ' yes' / ' no' (no EOS, as Pax).

The cache is two Megatron `.bin/.idx` pairs written with `IndexedDatasetWriter` (temporary names,
renamed when complete): the token ids, and beside them a uint8 mask (1 = the token is a trained
target). The same reader and checks as pretraining data; mmap'd, so every rank reads it for free. Its
name holds a digest of the source file's bytes and of every setting that changes the tokens, so an
edited source or another tokenizer/template builds a new cache and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llamatron.data.chat_templates import ROLES, Segments, render_messages, render_pair, resolve_template
from llamatron.data.indexed import IndexedDataset, IndexedDatasetWriter, token_dtype
from llamatron.errors import LlamatronError
from llamatron.loss import IGNORE_INDEX

ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
CACHE_VERSION = "1"


def boolq_prompt(passage: str, question: str) -> str:
    return f"{passage}\nquestion: {question}?\nanswer:"


def _text(rec: dict, key: str, where: str) -> str:
    if key not in rec:
        raise LlamatronError(f"{where}: missing field '{key}'")
    if not isinstance(rec[key], str):
        raise LlamatronError(f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}")
    return rec[key]


def _messages(rec: dict, where: str) -> list[dict]:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise LlamatronError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LlamatronError(f"{where}: messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                                 "\"content\": a string}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise LlamatronError(f"{where}: 'messages' has no assistant message to train on")
    return msgs


def render_record(rec: dict, template: str, tokenizer, where: str) -> Segments:
    """One JSONL record as (token ids, trained) segments."""
    if "messages" in rec:
        return render_messages(_messages(rec, where), template, tokenizer)
    if "passage" in rec and "question" in rec:
        if not isinstance(rec.get("label"), (bool, int)):
            raise LlamatronError(f"{where}: field 'label' must be true/false (or 1/0)")
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        prompt = boolq_prompt(_text(rec, "passage", where), _text(rec, "question", where))
        return [(bos + tokenizer.encode(prompt), False), (tokenizer.encode(" yes" if rec["label"] else " no"), True)]
    if "instruction" in rec:
        extra = rec.get("input") or ""
        prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if extra else "",
                                      instruction=_text(rec, "instruction", where),
                                      input=f"### Input:\n{extra}\n\n" if extra else "")
        return render_pair(prompt, _text(rec, "output", where), template, tokenizer)
    if "prompt" in rec:
        if "completion" not in rec and "response" not in rec:
            raise LlamatronError(f"{where}: missing field 'completion' (or 'response') beside 'prompt'")
        answer = "completion" if "completion" in rec else "response"
        return render_pair(_text(rec, "prompt", where), _text(rec, answer, where), template, tokenizer)
    raise LlamatronError(f"{where}: expected the fields prompt/completion, instruction/input/output, messages, "
                         f"or passage/question/label; got {', '.join(sorted(rec)) or 'none'}")


def read_jsonl(path: str | Path):
    """(where, record) per non-blank line; a malformed line is an error naming file and line."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlamatronError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise LlamatronError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield where, rec


def example_arrays(segments: Segments, train_on_input: bool) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.array([t for ids, _ in segments for t in ids], dtype=np.int64)
    mask = np.array([train_on_input or trained for ids, trained in segments for _ in ids], dtype=np.uint8)
    return tokens, mask


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class SFTCache:
    """The tokenized examples of one JSONL file: tokens and target masks, example i of each."""
    tokens: IndexedDataset
    mask: IndexedDataset
    prefix: str

    def __len__(self) -> int:
        return len(self.tokens)


def cache_prefix(source: str | Path, tokenizer, template: str, train_on_input: bool, cache_dir: str | None) -> str:
    source = Path(source)
    key = json.dumps([CACHE_VERSION, _file_digest(source), tokenizer.name, tokenizer.vocab_size, template,
                      train_on_input])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    directory = Path(cache_dir) if cache_dir else source.parent / f"{source.name}.cache"
    return str(directory / f"{source.stem}-{digest}")


def build_sft_cache(source: str | Path, tokenizer, template: str = "auto", train_on_input: bool = False,
                    cache_dir: str | None = None, log=print, key: str = "finetune.data") -> SFTCache:
    """Tokenize `source` into the cache (unless a cache of the same content and settings exists)."""
    if not Path(source).is_file():
        raise LlamatronError(f"config key '{key}': {source}: no such file")
    template = resolve_template(template, tokenizer)
    prefix = cache_prefix(source, tokenizer, template, train_on_input, cache_dir)
    if not _cache_complete(prefix):
        n = _write_cache(source, tokenizer, template, train_on_input, prefix)
        log(f"tokenized {n} fine-tuning examples of {source} into {prefix}_{{tokens,mask}}.bin/.idx")
    return SFTCache(IndexedDataset(f"{prefix}_tokens"), IndexedDataset(f"{prefix}_mask"), prefix)


def _cache_complete(prefix: str) -> bool:
    return all(Path(f"{prefix}_{kind}.{ext}").is_file() for kind in ("tokens", "mask") for ext in ("bin", "idx"))


def cached_document_tokens(cfg) -> float | None:
    """`SFTDataset.document_tokens` of a fine-tuning config's packed training data where it is tokenized
    already (an earlier run made the cache), for `llamatron plan --config`; None where it is not (the
    planner tokenizes nothing), without packing, or without fine-tuning data."""
    from llamatron.tokenizer import load_tokenizer

    ft = cfg.finetune
    if not ft.data or not ft.packing or not Path(ft.data).is_file():
        return None
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    prefix = cache_prefix(ft.data, tokenizer, resolve_template(ft.template, tokenizer), ft.train_on_input, ft.cache_dir)
    if not _cache_complete(prefix):
        return None
    cache = SFTCache(IndexedDataset(f"{prefix}_tokens"), IndexedDataset(f"{prefix}_mask"), prefix)
    return SFTDataset(cache, cfg.data.seq_len, True, cfg.data.seed, ft.too_long,
                      packing_algorithm=ft.packing_algorithm).document_tokens()


def _write_cache(source, tokenizer, template: str, train_on_input: bool, prefix: str) -> int:
    n = 0
    # Leaving the block finalizes the mask first, then the tokens: a cache is complete only once both
    # exist, and a crash in between leaves a mask alone, which is rebuilt.
    with IndexedDatasetWriter(f"{prefix}_tokens", token_dtype(tokenizer.vocab_size)) as tok, \
            IndexedDatasetWriter(f"{prefix}_mask", np.uint8) as msk:
        for where, rec in read_jsonl(source):
            tokens, mask = example_arrays(render_record(rec, template, tokenizer, where), train_on_input)
            if not mask[1:].any():
                raise LlamatronError(f"{where}: the example has no response tokens to train on")
            tok.add_document(tokens)
            msk.add_document(mask)
            n += 1
        if n == 0:
            raise LlamatronError(f"config key 'finetune.data': {source} holds no examples")
    return n


def shifted(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of one example: inputs t[:-1], labels t[1:] where that token is trained, else -100."""
    return tokens[:-1], np.where(mask[1:].astype(bool), tokens[1:], IGNORE_INDEX)


def fit_lengths(cache: SFTCache, seq_len: int, too_long: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(example ids kept, their input lengths, number truncated or dropped) for `seq_len` inputs.

    An example of L tokens gives L - 1 (input, label) positions; longer than seq_len it is cut to
    seq_len (`too_long = truncate`), left out (`drop`), or an error (`error`)."""
    lengths = cache.tokens.sequence_lengths.astype(np.int64) - 1
    over = lengths > seq_len
    if over.any() and too_long == "error":
        first = int(np.flatnonzero(over)[0])
        raise LlamatronError(f"config key 'finetune.too_long': example {first} has {lengths[first] + 1} tokens, "
                             f"more than data.seq_len + 1 = {seq_len + 1} (set finetune.too_long=truncate or drop)")
    ids = np.arange(len(lengths))
    if too_long == "drop":
        ids = ids[~over]
    return ids, np.minimum(lengths[ids], seq_len), int(over.sum())


class SFTDataset:
    """Sequences of `seq_len` positions built from the cache, each a [4, seq_len] int64 array:
    inputs, labels (-100 off-target and on padding), positions (restarting per example) and document
    ids (-1 on padding). Sample i is sequence perm_e[i % n] of epoch e = i // n, the permutation
    seeded by (seed, e): a resumed run reads exactly the samples it would have. Unshuffled (validation),
    sample i is sequence i: the packing's order, the same in every run."""

    def __init__(self, cache: SFTCache, seq_len: int, packing: bool, seed: int, too_long: str = "truncate",
                 pad_id: int = 0, packing_algorithm: str = "best_fit_decreasing", shuffle: bool = True):
        from llamatron.data.packing import pack

        self.cache, self.seq_len, self.seed, self.pad_id, self.packing = cache, seq_len, seed, pad_id, packing
        self.shuffle = shuffle
        self.ids, self.lengths, self.n_too_long = fit_lengths(cache, seq_len, too_long)
        if len(self.ids) == 0:
            raise LlamatronError(f"{cache.prefix}: no example fits data.seq_len {seq_len}")
        bins = pack(self.lengths, seq_len, packing_algorithm) if packing else [[i] for i in range(len(self.ids))]
        self.bins = bins
        self._perm_epoch, self._perm = -1, None

    def describe(self) -> str:
        """One line for the run's log: examples, sequences, and what did not fit."""
        cut = f"; {self.n_too_long} longer than data.seq_len + 1 tokens were " if self.n_too_long else ""
        if cut:
            cut += "dropped" if len(self.ids) < len(self.cache) else "truncated"
        used = int(self.lengths.sum())
        documents = (f"; attention within documents of {self.document_tokens():,.0f} positions on average "
                     "(llamatron plan --document-tokens)" if self.packing else "")
        return (f"fine-tuning data {self.cache.prefix}: {len(self.ids)} examples in {len(self.bins)} sequences of "
                f"{self.seq_len} ({'packed' if self.packing else 'padded'}, {used / (len(self.bins) * self.seq_len):.0%} "
                f"of positions used){cut}{documents}")

    def document_tokens(self) -> float:
        """The mean positions of a token's own document over an epoch, sum(len_i^2) / positions: what
        the document mask leaves of causal attention, seq x this (the planner's `--document-tokens`).
        The padding run counts as one document (the mask lets it attend to itself); unpacked sequences
        have no document mask, so they attend over all seq_len positions."""
        if not self.packing:
            return float(self.seq_len)
        filled = np.array([self.lengths[b].sum() for b in self.bins], dtype=np.float64)
        squares = float((self.lengths.astype(np.float64) ** 2).sum() + ((self.seq_len - filled) ** 2).sum())
        return squares / (len(self.bins) * self.seq_len)

    def __len__(self) -> int:
        return len(self.bins)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.bins))
        if epoch != self._perm_epoch:
            self._perm = np.random.RandomState((self.seed * 1_000_003 + epoch) % 2**32).permutation(len(self.bins))
            self._perm_epoch = epoch
        return self._perm

    def __getitem__(self, i: int) -> np.ndarray:
        b = self.bins[int(self._order(i // len(self.bins))[i % len(self.bins)])]
        out = np.empty((4, self.seq_len), dtype=np.int64)
        out[0], out[1], out[2], out[3] = self.pad_id, IGNORE_INDEX, 0, -1
        at = 0
        for doc, j in enumerate(b):
            n = int(self.lengths[j])
            ex = int(self.ids[j])
            inp, lab = shifted(self.cache.tokens[ex][: n + 1].astype(np.int64), self.cache.mask[ex][: n + 1])
            out[0, at : at + n], out[1, at : at + n] = inp, lab
            out[2, at : at + n], out[3, at : at + n] = np.arange(n), doc
            at += n
        return out

    def batch(self, indices, device) -> tuple:
        """(tokens, labels, model keyword inputs) of samples `indices` on `device`: the protocol
        validation reads a dataset through (`eval/perplexity.py`), as it reads windows of token files."""
        (tokens, labels, extras), _ = load_sft_batch(self, indices, device)
        return tokens, labels, extras

    def target_tokens(self) -> int:
        """Trained (label) positions over one epoch: what a step's loss is averaged over."""
        return int(sum(int((self.cache.mask[int(self.ids[j])][1 : int(self.lengths[j]) + 1]).sum())
                       for j in range(len(self.ids))))


def load_sft_batch(dataset: SFTDataset, indices, device, vocab_size: int | None = None):
    """(tokens, labels, extras) on `device` and the number of trained labels; extras (positions,
    document ids) only for packed data: an unpadded, unpacked sequence needs only the causal mask."""
    import torch

    arr = np.stack([dataset[int(i)] for i in indices])
    if vocab_size is not None and arr[:, 0].max() >= vocab_size:
        raise LlamatronError(f"{dataset.cache.prefix}: token id {int(arr[:, 0].max())} is outside the model "
                             f"vocabulary [0, {vocab_size}) (check data.tokenizer)")
    t = torch.from_numpy(arr)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    tokens, labels = t[:, 0].contiguous(), t[:, 1].contiguous()
    extras = {"positions": t[:, 2].contiguous(), "document_ids": t[:, 3].contiguous()} if dataset.packing else {}
    return (tokens, labels, extras), int((arr[:, 1] != IGNORE_INDEX).sum())



def build_sft_dataset(cfg, log=print, valid: bool = False) -> SFTDataset:
    """The training dataset of a fine-tuning run's config (`[finetune]`, data.seq_len, data.seed), or
    with `valid` its validation examples (`finetune.valid`), packed the same way, unshuffled."""
    from llamatron.tokenizer import load_tokenizer

    ft = cfg.finetune
    source, key = (ft.valid, "finetune.valid") if valid else (ft.data, "finetune.data")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cache = build_sft_cache(source, tokenizer, ft.template, ft.train_on_input, ft.cache_dir, log, key)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    return SFTDataset(cache, cfg.data.seq_len, ft.packing, cfg.data.seed, ft.too_long, pad, ft.packing_algorithm,
                      shuffle=not valid)
