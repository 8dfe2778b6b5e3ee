"""BoolQ (`{"passage", "question", "label"}` per line; Google's own files say `answer`): a yes/no
question about a passage, answered by comparing the summed log-likelihoods of the two answers.

`harness` prompt (lm-eval `super_glue/boolq`): "{passage}\\nQuestion: {question}?\\nAnswer:" with ' no'
/ ' yes'. `pax` prompt: "{passage}\\nquestion: {question}?\\nanswer:" with the answer words scored as
Pax's SentencePiece tokenizes a separate target (a word-initial token: ' yes' / ' no'). A tie counts
as 'no', as the harness's argmax does.
"""

from __future__ import annotations

from llamatron.eval.tasks import Task, field

LABEL = ("label", "answer")


def requests(doc: dict, prompt: str) -> list[tuple[str, str]]:
    q, a = ("question", "answer") if prompt == "pax" else ("Question", "Answer")
    context = f"{doc['passage']}\n{q}: {doc['question']}?\n{a}:"
    return [(context, " no"), (context, " yes")]


def score(doc: dict, results: list[tuple[float, bool]]) -> dict[str, float]:
    (ll_no, _), (ll_yes, _) = results
    return {"acc": float((ll_yes > ll_no) == _truth(field(doc, LABEL)))}


def _truth(label) -> bool:
    if isinstance(label, str):
        return label.strip().lower() in ("true", "yes", "1")
    return bool(label)


TASK = Task(name="boolq", fields=("passage", "question", LABEL), requests=requests, score=score,
            aggregation={"acc": "mean"}, default_file="boolq.jsonl")
