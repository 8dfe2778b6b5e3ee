"""Tokenizers: the Llama 3.1 tiktoken BPE, and any tiktoken / SentencePiece / HF tokenizer file.

`load_tokenizer()` returns an object with `.name`, `.vocab_size` (special tokens included),
`.bos_id`, `.eos_id`, `.special_tokens`, `.encode(text)`, `.encode_batch(texts)` and `.decode(ids)`.
`encode` never adds BOS/EOS and treats special-token text as ordinary text, which is what the MLPerf
pipeline's `tokenize()` + `convert_tokens_to_ids()` does for Llama 3.1 (REFERENCE B.2, C.3).
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from llamatron.errors import LlamatronError

LLAMA3_NAMES = ("llama3", "llama3.1")

# Pre-tokenization regex of Llama 3 (REFERENCE C.3; llama-models `Tokenizer.pat_str`).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256

# Meta feeds tiktoken at most 400k characters at a time and cuts runs of more than 25k whitespace or
# non-whitespace characters (tiktoken issue 195: deep regex backtracking panics). The cuts change the
# tokens next to them, so they are reproduced exactly to get Meta's ids.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# A maximal run longer than MAX_RUN_CHARS. The lookbehinds make a match start only where a run starts,
# so the search stays linear. Python's `\s` is exactly `str.isspace()` over all of Unicode, which is
# the predicate Meta's splitter uses.
_LONG_RUN = re.compile(r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))


def llama3_special_token_names() -> list[str]:
    """Names of ids 128000..128255 as in the Llama 3.1 HF `tokenizer.json` (REFERENCE C.3, HF column)."""
    names = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    names += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + NUM_SPECIAL_TOKENS - len(names))]
    return names


def meta_pieces(text: str) -> Iterator[str]:
    """The pieces Meta's `Tokenizer.encode` hands to tiktoken, computed without a per-character loop."""
    for start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        chunk = text[start : start + TIKTOKEN_MAX_ENCODE_CHARS]
        if len(chunk) <= MAX_RUN_CHARS:  # no run can be too long: the common case, no regex scan
            yield chunk
            continue
        # Meta cuts a run that starts at r at r+25000, r+50000, ... (each cut restarts the count).
        cut = 0
        for m in _LONG_RUN.finditer(chunk):
            for pos in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
                yield chunk[cut:pos]
                cut = pos
        yield chunk[cut:]


class Tokenizer:
    """What the data pipeline and trainer need from a tokenizer."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    special_tokens: dict[str, int]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE file (`base64 rank` lines) with Llama 3's regex and 256 special tokens after it."""

    def __init__(self, path: Path, name: str):
        import tiktoken

        ranks = _read_tiktoken_ranks(path)
        n_base = len(ranks)
        names = llama3_special_token_names()
        self.special_tokens = {tok: n_base + i for i, tok in enumerate(names)}
        self._enc = tiktoken.Encoding(
            name=name, pat_str=LLAMA3_PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.name = name
        self.path = path
        self.vocab_size = n_base + len(names)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]

    def encode(self, text: str) -> list[int]:
        enc = self._enc.encode_ordinary  # = encode(allowed_special=set(), disallowed_special=()), Meta's default
        if len(text) <= MAX_RUN_CHARS:
            return enc(text)
        out: list[int] = []
        for piece in meta_pieces(text):
            out.extend(enc(piece))
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # tiktoken 0.14 holds the GIL while encoding (measured: 2 threads are no faster than 1), so the
        # fast path is a plain loop; parallelism comes from worker processes in preprocessing.
        encode = self.encode
        return [encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(_int_list(ids))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` (e.g. Mixtral's), encoded like the slow HF `LlamaTokenizer` without BOS."""

    def __init__(self, path: Path, name: str):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise LlamatronError(f"{path}: cannot load as a SentencePiece model ({_one_line(e)})") from None
        self.name = name
        self.path = path
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.special_tokens = {
            self._sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self._sp.is_control(i) or self._sp.is_unknown(i)
        }

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(_int_list(ids))


def _valid_unicode(text: str) -> str:
    """Lone surrogates (JSON allows "\\ud800") replaced by U+FFFD, as tiktoken does: the Rust
    tokenizers only take valid Unicode."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class HFTokenizer(Tokenizer):
    """An HF `tokenizer.json` through the `tokenizers` library, special tokens not added (NeMo's
    `tokenize()` + `convert_tokens_to_ids()`, which is what MLPerf's preprocessing calls)."""

    def __init__(self, path: Path, name: str):
        import tokenizers

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            raise LlamatronError(f"{path}: cannot load as an HF tokenizer.json ({_one_line(e)})") from None
        self.name = name
        self.path = path
        # len(tokenizer) in transformers: the model vocabulary plus added tokens.
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items()) if t.special}
        bos, eos = _hf_bos_eos_names(path)
        self.bos_id = self._first_id(bos, ["<|begin_of_text|>", "<s>", "<bos>", "[CLS]"])
        self.eos_id = self._first_id(eos, ["<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[SEP]"])

    def _first_id(self, configured: str | None, candidates: list[str]) -> int | None:
        for tok in ([configured] if configured else []) + candidates:
            i = self._tok.token_to_id(tok)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        try:
            encoded = self._tok.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:  # how the Rust side refuses a str with a lone surrogate; the rare slow path
            encoded = self._tok.encode_batch([_valid_unicode(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_int_list(ids), skip_special_tokens=False)


def load_tokenizer(name_or_path: str = "llama3") -> Tokenizer:
    """'llama3' / 'llama3.1': the Llama 3.1 BPE shipped in `llama-models`. Otherwise a path: a tiktoken
    `tokenizer.model`, a SentencePiece `.model`, an HF `tokenizer.json`, or a directory holding one.
    The result is cached per name/path: tokenizers are immutable."""
    name = str(name_or_path)
    if name.lower() in LLAMA3_NAMES:
        return _load("tiktoken", str(_llama3_model_path()), "llama3")
    path = Path(name).expanduser()
    if path.is_dir():
        for candidate in ("tokenizer.json", "tokenizer.model"):
            if (path / candidate).is_file():
                path = path / candidate
                break
        else:
            raise LlamatronError(
                f"{path}: directory holds neither tokenizer.json nor tokenizer.model; expected an HF tokenizer "
                f"directory, a tokenizer file, or 'llama3'"
            )
    elif not path.is_file():
        raise LlamatronError(
            f"{path}: no such tokenizer file or directory; expected 'llama3', a tiktoken or SentencePiece "
            f"tokenizer.model, an HF tokenizer.json, or a directory holding one"
        )
    return _load(_sniff_kind(path), str(path.resolve()), name)


@functools.lru_cache(maxsize=8)
def _load(kind: str, path: str, name: str) -> Tokenizer:
    cls = {"tiktoken": TiktokenTokenizer, "sentencepiece": SentencePieceTokenizer, "hf": HFTokenizer}[kind]
    return cls(Path(path), name)


def _llama3_model_path() -> Path:
    # find_spec locates the package without importing it (its Tokenizer class is deliberately not used).
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise LlamatronError(
            "tokenizer 'llama3': the llama-models package is not installed (pip install llama-models); "
            "or pass the path of a Llama 3.1 tokenizer.model"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "llama3" / "tokenizer.model"
        if path.is_file():
            return path
    raise LlamatronError(
        f"tokenizer 'llama3': {Path(list(spec.submodule_search_locations)[0]) / 'llama3' / 'tokenizer.model'} "
        f"not found in the llama-models package; expected the Llama 3.1 tiktoken BPE file there"
    )


_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*[ ]\d+\r?$")


def _sniff_kind(path: Path) -> str:
    """Tell the three file formats apart by content, not by name (all three are called tokenizer.*)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    first_line = head.split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.match(first_line):
        return "tiktoken"
    if head.lstrip()[:1] == b"{":
        return "hf"
    if head[:1] == b"\x0a":  # protobuf field 1 (pieces), length-delimited: a SentencePiece ModelProto
        return "sentencepiece"
    raise LlamatronError(
        f"{path}: unrecognized tokenizer file; expected a tiktoken BPE file ('base64 rank' lines), "
        f"a SentencePiece .model, or an HF tokenizer.json"
    )


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise LlamatronError(
                    f"{path}:{lineno}: bad tiktoken BPE line {line[:60]!r}; expected 'base64-token rank'"
                ) from None
    if not ranks:
        raise LlamatronError(f"{path}: empty tiktoken BPE file; expected 'base64-token rank' lines")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise LlamatronError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def _hf_bos_eos_names(path: Path) -> tuple[str | None, str | None]:
    """bos/eos token names from a `tokenizer_config.json` next to `tokenizer.json`, if there is one."""
    cfg_path = path.with_name("tokenizer_config.json")
    if not cfg_path.is_file():
        return None, None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LlamatronError(f"{cfg_path}: not valid JSON ({_one_line(e)})") from None

    def content(v):
        return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None

    return content(cfg.get("bos_token")), content(cfg.get("eos_token"))


def _int_list(ids) -> list[int]:
    # numpy arrays (e.g. a row of a .bin file) become plain ints, which every backend accepts
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
