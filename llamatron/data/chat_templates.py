"""Rendering fine-tuning examples as token segments: (ids, trained) pairs, the trained ones being the
response tokens the loss is computed on.

Templates:
  - llama3: Llama 3.1's header tokens, as Meta's `ChatFormat` / the HF chat template write them:
    <|begin_of_text|> then per message <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>;
    a prompt/completion pair is one user and one assistant message.
  - llama2: LLaMA-2 chat's `[INST]` turns, `<s>[INST] <<SYS>>\\nSYS\\n<</SYS>>\\n\\nUSER [/INST] ANSWER </s>`.
  - plain: BOS + prompt + completion + EOS, nothing added (GPT-style and BoolQ's Pax prompt).
`auto` picks llama3 for a tokenizer with Llama 3's special tokens, else plain.
"""

from __future__ import annotations

from llamatron.errors import LlamatronError

TEMPLATES = ("auto", "llama3", "llama2", "plain")
ROLES = ("system", "user", "assistant")

Segments = list[tuple[list[int], bool]]


def resolve_template(name: str, tokenizer) -> str:
    if name != "auto":
        return name
    return "llama3" if "<|start_header_id|>" in getattr(tokenizer, "special_tokens", {}) else "plain"


def _special(tokenizer, name: str) -> int:
    ids = getattr(tokenizer, "special_tokens", {})
    if name not in ids:
        raise LlamatronError(f"tokenizer {tokenizer.name}: has no special token {name}; the llama3 chat template "
                             "needs Llama 3's tokenizer (set finetune.template)")
    return ids[name]


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_id] if tokenizer.bos_id is not None else []


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_id] if tokenizer.eos_id is not None else []


def render_messages(messages: list[dict], template: str, tokenizer) -> Segments:
    """A conversation as segments; the assistant messages are trained, everything else is prompt."""
    if template == "llama3":
        return _llama3(messages, tokenizer)
    if template == "llama2":
        return _llama2(messages, tokenizer)
    segs: Segments = [(_bos(tokenizer), False)]
    for m in messages:
        segs.append((tokenizer.encode(m["content"]), m["role"] == "assistant"))
    segs.append((_eos(tokenizer), messages[-1]["role"] == "assistant"))
    return segs


def _llama3(messages: list[dict], tokenizer) -> Segments:
    start, end = _special(tokenizer, "<|start_header_id|>"), _special(tokenizer, "<|end_header_id|>")
    eot = _special(tokenizer, "<|eot_id|>")
    segs: Segments = [([_special(tokenizer, "<|begin_of_text|>")], False)]
    for m in messages:
        header = [start, *tokenizer.encode(m["role"]), end, *tokenizer.encode("\n\n")]
        trained = m["role"] == "assistant"
        segs.append((header, False))
        # The end-of-turn token is trained too: the model must learn to stop.
        segs.append((tokenizer.encode(m["content"]) + [eot], trained))
    return segs


def _llama2(messages: list[dict], tokenizer) -> Segments:
    segs: Segments = []
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n", messages[1:]
    for m in messages:
        if m["role"] == "user":
            segs.append((_bos(tokenizer) + tokenizer.encode(f"[INST] {system}{m['content'].strip()} [/INST]"), False))
            system = ""
        else:
            segs.append((tokenizer.encode(f" {m['content'].strip()} ") + _eos(tokenizer), True))
    return segs


def render_pair(prompt: str, completion: str, template: str, tokenizer) -> Segments:
    """A prompt/completion pair: plain concatenates them; the chat templates make it one exchange."""
    if template == "plain":
        return [(_bos(tokenizer) + tokenizer.encode(prompt), False), (tokenizer.encode(completion) + _eos(tokenizer), True)]
    return render_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                           template, tokenizer)
