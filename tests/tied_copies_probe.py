"""Run by test_gpt_layouts.py under torchrun instead of `python -m llamatron`: `tied_copies_probe.py DIR
ARGS...` runs `llamatron ARGS...` and, after every optimizer step, saves this rank's copy of the tied
embedding weight (a pipeline's first and last stage each hold one) to DIR/step{S}_rank{R}.pt, so the
test can check that the copies stay equal."""

import sys
from pathlib import Path

import torch

from llamatron import hooks
from llamatron.cli import main

OUT = Path(sys.argv[1])


def save_copy(step: int, rank: int, model) -> None:
    if model.embeddings is not None:
        torch.save(model.embeddings.tok.weight.detach().clone(), OUT / f"step{step}_rank{rank}.pt")


hooks.add("step_end", save_copy)
sys.exit(main(sys.argv[2:]))
