"""LAMBADA (OpenAI's file, `{"text": ...}` per line): predict the last word from the passage.

As the harness's `lambada_openai`: context = the text up to its last space, continuation = ' ' +
the last word; `acc` counts items where every target token is the greedy argmax (Pax's
`acc_strict`), `perplexity` is exp(-mean target log-likelihood) over items. The `pax` prompt
straightens curly quotes first, as Pax's task does.
"""

from __future__ import annotations

from llamatron.eval.tasks import Task

_STRAIGHT = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


def requests(doc: dict, prompt: str) -> list[tuple[str, str]]:
    text = doc["text"].translate(_STRAIGHT) if prompt == "pax" else doc["text"]
    # The harness splits on ' ' (not any whitespace): text.split(' ')[:-1] joined, ' ' + the last.
    context, _, word = text.rpartition(" ")
    return [(context, " " + word)]


def score(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    (ll, greedy), = results
    return {"acc": float(greedy), "perplexity": ll}


TASK = Task(name="lambada", fields=("text",), requests=requests, score=score,
            aggregation={"acc": "mean", "perplexity": "perplexity"}, default_file="lambada.jsonl")
