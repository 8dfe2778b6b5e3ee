"""Log-likelihood of continuations: the one scoring path of every zero-shot task.

A request is (context tokens, continuation tokens); its score is (sum of the continuation's token
log-probabilities, whether every continuation token is the greedy argmax). The definitions are
lm-evaluation-harness's (`HFLM._loglikelihood_tokens`): the input is context + continuation without
its last token, left-truncated to the model's context; log-softmax in fp32; right padding (causal
attention: a padded row's scored positions never see the padding). Requests are sorted by length,
longest first, so a batch pads to its first row and out-of-memory shows at once; requests with the
same input and continuation length (choices after one context, each one token) share one row.

Strings become requests as the harness's `TemplateLM` makes them (`encode_pair`), so the built-in
tasks and the lm-eval adapter (`eval/harness.py`) score the same tokens.

Any family that keeps the module protocol (`model(tokens)` -> logits) works, as a module or a
`Layout`: data-parallel ranks score interleaved batches and gather the results; tensor-parallel
logits (vocabulary-sharded DTensors) are gathered before the softmax.

Fast path: a family whose forward takes `logits_at` (models/family.py) computes the output layer
only at the scored positions (a LAMBADA request scores 1-3 of its ~80: the [batch, seq, vocab]
logits were most of the memory traffic), without tensor parallelism; the log-softmax is one batched
fp32 op over those rows and the per-request sums and greedy flags stay on the device until one host
copy per batch. Batches are padded to their longest row, and on CUDA each block runs compiled
with dynamic shapes (one graph for every batch; `compile`).

A family whose forward takes `lengths` (GLaM: routing with expert capacity is not causal, and
padding would compete for the experts' slots) is told each row's real length, so that padding and
batch mates change no score there either.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from llamatron.errors import LlamatronError
from llamatron.models.kv_cache import KVCache
from llamatron.parallel.layout import Layout, plain
from llamatron.runtime import Precision
from llamatron.transforms.compile import compile_for_eval

Request = tuple[Sequence[int], Sequence[int]]  # (context tokens, continuation tokens)


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int | None,
                add_bos: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation), as lm-eval's TemplateLM makes them.

    Trailing spaces of the context move to the continuation, and the continuation is what encoding
    the whole string adds after the context's tokens (so a merge across the boundary is scored as
    the model would see it). An empty context becomes `prefix_id` (BOS, or EOS without one)."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    if context == "":
        cont = tokenizer.encode(continuation)
        if prefix_id is None:
            raise LlamatronError("an empty context needs a BOS or EOS token; the tokenizer has neither")
        if cont and cont[0] == prefix_id:
            return cont[:1], cont[1:]
        return [prefix_id], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = bos + tokenizer.encode(context + continuation)
    ctx = bos + tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def _as_layout(model) -> Layout:
    layout = model if isinstance(model, Layout) else Layout.single(model)
    if layout.pipeline is not None or layout.dims.cp > 1:
        raise LlamatronError("zero-shot scoring needs whole sequences on a rank: not under pipeline or "
                             "context parallelism (set parallel.pp=1 and parallel.cp=1)")
    return layout


def _model_inputs(req: Request, max_len: int) -> tuple[list[int], int]:
    """(input tokens, continuation length): context + continuation minus its last token, left-truncated."""
    ctx, cont = list(req[0]), list(req[1])
    if not ctx or not cont:
        raise LlamatronError("a log-likelihood request needs a non-empty context and continuation")
    if len(cont) > max_len:
        raise LlamatronError(f"a continuation of {len(cont)} tokens exceeds the model context of {max_len}")
    return (ctx + cont)[-(max_len + 1):][:-1], len(cont)


def padded_tokens(rows: list[list[int]], multiple: int, pad_id: int = 0) -> torch.Tensor:
    """Right-padded rows [len(rows), longest rounded up to `multiple`], built in one tensor."""
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def forward_logits(layout: Layout, rows: list[list[int]], device, precision: Precision | None,
                   pad_id: int = 0) -> tuple[torch.Tensor, list[int]]:
    """One forward over right-padded rows: logits [batch, longest, vocab] and the row lengths. Under
    tensor (sequence) parallelism the padded length is a multiple of tp, which shards it evenly."""
    tokens = padded_tokens(rows, layout.dims.tp, pad_id)
    precision = precision or Precision(None, None)
    with precision.autocast(device):
        logits = plain(layout.model(tokens.to(device), **_lengths(layout, rows, device)))
    return logits, [len(r) for r in rows]


def _lengths(layout: Layout, rows: list[list[int]], device) -> dict:
    """{"lengths": each row's real tokens} for a family whose forward takes them (the module
    protocol's optional padding lengths: GLaM routes without the padding), else nothing."""
    if "lengths" not in inspect.signature(layout.model.forward).parameters:
        return {}
    return {"lengths": torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)}


def _selects_logits(layout: Layout) -> bool:
    """A family whose forward takes `logits_at` (the module protocol's optional selected logits), on a
    layout without tensor parallelism (its output layer is vocabulary-sharded and its norm's input
    sequence-sharded: the full logits are gathered there instead)."""
    return layout.dims.tp == 1 and "logits_at" in inspect.signature(layout.model.forward).parameters


def _compiles(layout: Layout, device, compile: bool | None) -> bool:
    """compile None: on CUDA only (on the CPU the compile takes longer than it saves). A model in one
    process only: a torchrun layout's blocks are FSDP or TP units, built without compile."""
    if compile is None:
        compile = torch.device(device).type == "cuda"
    return bool(compile) and layout.dims.world_size == 1


def _score_batch(layout, batch: list[tuple[list[int], int, list[list[int]]]], device, precision, select: bool,
                 multiple: int) -> list[list[tuple[float, bool]]]:
    """One forward, then a batched fp32 log-softmax over the scored positions only, and per-request
    sums and greedy flags on the device: one host copy per batch. An entry is one model input, its
    continuation length and the continuations of the requests sharing that input (`_shared`)."""
    rows = [inp for inp, _, _ in batch]
    tokens = padded_tokens(rows, math.lcm(WIDTH_MULTIPLE, layout.dims.tp))
    # (row, position) of every scored token, built on the host in one go; each request reads its
    # input's rows of those: (scored row, slot in the request) and its target token.
    where = [(i, len(inp) - n + j) for i, (inp, n, _) in enumerate(batch) for j in range(n)]
    row, col = torch.tensor(where, dtype=torch.long, device=device).unbind(1)
    first = list(itertools.accumulate((n for _, n, _ in batch), initial=0))
    reads = [(first[i] + j, j, t) for i, (_, _, conts) in enumerate(batch) for cont in conts for j, t in enumerate(cont)]
    scored, slot, target = torch.tensor(reads, dtype=torch.long, device=device).unbind(1)
    requests = [n for _, n, conts in batch for _ in conts]
    request = torch.tensor([r for r, n in enumerate(requests) for _ in range(n)], dtype=torch.long, device=device)
    with (precision or Precision(None, None)).autocast(device):
        if select:
            # The scored rows padded too (repeats of the last): the output GEMM's row count stays
            # aligned, and a request's logits do not depend on how many rows its batch scores (the
            # CPU's kernels for fewer than 4 rows round differently).
            at = torch.stack((row, col), 1)
            at = torch.cat((at, at[-1:].expand(-len(at) % multiple, 2)))
            logits = layout.model(tokens.to(device), logits_at=at, **_lengths(layout, rows, device))[: len(row)]
        else:
            logits = plain(layout.model(tokens.to(device), **_lengths(layout, rows, device)))[row, col]
    logp = torch.log_softmax(logits.float(), dim=-1)
    values = torch.stack((logp[scored, target], (logp.argmax(-1)[scored] != target).float()))
    # Each token to its own cell, then a sum per request, in fp64: the padding cells and the
    # reduction's order (which depends on the batch's longest continuation) then change nothing
    # visible. Not index_add: its CUDA atomics add in a different order from run to run.
    table = torch.zeros(2, len(requests), max(requests), dtype=torch.float64, device=logp.device)
    table[:, request, slot] = values.double()
    sums, misses = table.sum(-1).tolist()
    scores = iter([(s, m == 0) for s, m in zip(sums, misses)])
    return [[next(scores) for _ in conts] for _, _, conts in batch]


def _shared(prepared: list[tuple[list[int], int, list[int]]]) -> tuple[list, list[list[int]]]:
    """Requests with the same model input and continuation length share one forward: a task's choices
    after one context, each a single token (BoolQ's yes / no, a multiple-choice letter), as
    lm-eval's HF backend shares them. Returns the distinct (input, length, [continuations]) and, for
    each, the indices of its requests."""
    first: dict[tuple, int] = {}
    entries, members = [], []
    for i, (inp, n, cont) in enumerate(prepared):
        key = (tuple(inp), n)
        if key not in first:
            first[key] = len(entries)
            entries.append((inp, n, []))
            members.append([])
        entries[first[key]][2].append(cont)
        members[first[key]].append(i)
    return entries, members


# The scored rows' count is padded to a multiple of this: the output layer's GEMM stays aligned.
PAD_MULTIPLE = 8
# A batch's width is padded to a multiple of this (and of tp): its longest row only. Sorted by length,
# a batch's rows are of nearly one length, and rounding each batch up to 8 tokens ran ~4% more tokens
# through the blocks (LAMBADA-shaped requests; the 8B's FP8 GEMMs 1,891 ms against 2,003 on an H200).
WIDTH_MULTIPLE = 1


@torch.no_grad()
def loglikelihoods(model, requests: Sequence[Request], batch_size: int, device, precision: Precision | None = None,
                   max_len: int | None = None, compile: bool | None = None) -> list[tuple[float, bool]]:
    """(sum log-probability, is_greedy) of each request's continuation, in the requests' order.

    `model` is a module or a `Layout`; every rank of a layout calls this with the same requests and
    gets all the results. `max_len`: the context to truncate to (default: the model's max_seq_len).
    `compile` (None: on CUDA) compiles the model's blocks in place, once, with dynamic shapes
    (`transforms.compile.compile_for_eval`): later calls, and any other use of the model, run them
    compiled (generation here runs them eagerly)."""
    layout = _as_layout(model)
    max_len = max_len or layout.model.args.max_seq_len
    if _compiles(layout, device, compile):
        compile_for_eval(layout.model)
    select = _selects_logits(layout)
    multiple = math.lcm(PAD_MULTIPLE, layout.dims.tp)
    entries, members = _shared([(*_model_inputs(r, max_len), list(r[1])) for r in requests])
    order = sorted(range(len(entries)), key=lambda i: (-len(entries[i][0]), i))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    dp, rank = layout.dims.dp, layout.dims.dp_rank
    was_training = layout.training
    layout.train(False)
    mine: dict[int, list[tuple[float, bool]]] = {}
    # Every data-parallel rank runs the same number of forwards (FSDP gathers need all of them); one
    # with no batch left scores a copy of the first and drops it.
    for b in range(rank, len(batches) + (-len(batches)) % dp, dp):
        idx = batches[b] if b < len(batches) else batches[0][:1]
        scores = _score_batch(layout, [entries[i] for i in idx], device, precision, select, multiple)
        if b < len(batches):
            mine.update(zip(idx, scores))
    layout.train(was_training)
    if dp > 1:
        mine = _gather(mine, layout.dims)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    for e, idx in enumerate(members):
        for i, score in zip(idx, mine[e]):
            results[i] = score
    return results


def _gather(mine: dict, dims) -> dict:
    parts: list[dict | None] = [None] * dims.dp
    dist.all_gather_object(parts, mine, group=dims.group("dp"))
    return {k: v for part in parts for k, v in part.items()}


def _decodes_with_cache(layout: Layout) -> bool:
    """A family whose forward takes `cache` (the module protocol's optional incremental decode), on
    a layout without tensor parallelism (its sequence-parallel activations split the sequence: a
    single new token does not split)."""
    return layout.dims.tp == 1 and "cache" in inspect.signature(layout.model.forward).parameters


class _CachedDecoder:
    """Greedy steps through a KV cache: the first forward prefills the left-padded prompts, each later
    one feeds one token per row; rows that stop are dropped from the cache."""

    def __init__(self, layout: Layout, device, precision: Precision | None, max_new: int):
        self.layout, self.device, self.max_new = layout, device, max_new
        self.precision = precision or Precision(None, None)
        self.cache: KVCache | None = None
        self.rows: list[int] = []

    def last_logits(self, active: list[int], seqs: list[list[int]]) -> torch.Tensor:
        """Logits [rows, vocab] after the last token of each active row's sequence."""
        if self.cache is None:
            width = max(len(s) for s in seqs)
            tokens = torch.zeros(len(seqs), width, dtype=torch.long)
            for r, s in enumerate(seqs):
                tokens[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            self.cache = KVCache([width - len(s) for s in seqs], width + self.max_new - 1, self.device)
        else:
            if active != self.rows:
                self.cache.keep([self.rows.index(i) for i in active])
            tokens = torch.tensor([s[-1:] for s in seqs], dtype=torch.long)
        self.rows = list(active)
        with self.precision.autocast(self.device):
            logits = plain(self.layout.model(tokens.to(self.device), cache=self.cache))
        return logits[:, -1]


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[Sequence[int]], max_new: int, device, precision: Precision | None = None,
                    stop=None, eos_id: int | None = None, max_len: int | None = None,
                    use_cache: bool = True) -> list[list[int]]:
    """Greedy continuation tokens of each prompt: at most `max_new`, ending after `eos_id` or once
    `stop(tokens so far)` is true. Rows that stop leave the batch; every rank of a layout generates
    every prompt (the same forwards, so FSDP ranks stay in step).

    With `use_cache` and a family that decodes with a KV cache, the prompts are prefilled in one
    forward and each step feeds one token per row; once a sequence would exceed `max_len` (or
    without a cache) each step recomputes the whole left-truncated sequence, exact but slow."""
    layout = _as_layout(model)
    # Eagerly, whatever scoring compiled: a decode step's shapes and cache state would recompile.
    with torch.compiler.set_stance("force_eager"):
        return _greedy(layout, prompts, max_new, device, precision, stop, eos_id,
                       max_len or layout.model.args.max_seq_len, use_cache)


def _greedy(layout: Layout, prompts, max_new: int, device, precision, stop, eos_id, max_len: int,
            use_cache: bool) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    active = [i for i, p in enumerate(prompts) if len(p)]
    decoder = _CachedDecoder(layout, device, precision, max_new) if use_cache and _decodes_with_cache(layout) else None
    was_training = layout.training
    layout.train(False)
    for _ in range(max_new):
        if not active:
            break
        seqs = [list(prompts[i]) + out[i] for i in active]
        if decoder is not None and max(len(s) for s in seqs) > max_len:
            decoder = None  # the window slides from here: positions shift, the cache no longer holds
        if decoder is not None:
            last = decoder.last_logits(active, seqs)
        else:
            logits, lengths = forward_logits(layout, [s[-max_len:] for s in seqs], device, precision)
            last = logits[torch.arange(len(active)), torch.tensor(lengths, device=logits.device) - 1]
        for i, t in zip(list(active), last.float().argmax(-1).tolist()):
            out[i].append(t)
            if t == eos_id or (stop is not None and stop(out[i])):
                active.remove(i)
    layout.train(was_training)
    return out
