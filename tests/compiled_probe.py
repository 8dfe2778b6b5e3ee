"""Run by test_compiled_layouts.py under torchrun instead of `python -m llamatron`: `compiled_probe.py ARGS...`
runs `llamatron ARGS...` with `train.compile`'s backend swapped for inductor's partitioner without its code
generation (llamatron/testing/compiled.py): the graphs a GPU run compiles, traced and partitioned as
inductor does it, then run op by op, in seconds on a CPU rather than minutes of C++ compilation. After
each step every rank prints how many graphs it has compiled: with attention (the blocks), with a norm
but no attention (the final norm), and others (train.bf16_residual's casts of a block's output, which
dynamo compiles as graphs of their own)."""

import sys

from llamatron import hooks
from llamatron.cli import main
from llamatron.testing.compiled import inductor_partitioner
from llamatron.transforms import compile as compile_transform

graphs = {"blocks": 0, "norm": 0, "other": 0}


def backend(gm, example_inputs):
    kind = ("blocks" if "scaled_dot_product" in gm.code else "norm" if "rsqrt" in gm.code or "layer_norm" in gm.code
            else "other")
    graphs[kind] += 1
    return inductor_partitioner()(gm, example_inputs)


def report(step: int, rank: int, model) -> None:
    print(f"compiled_probe rank {rank}: {graphs['blocks']} block graphs, {graphs['norm']} norm, {graphs['other']} other",
          flush=True)


compile_transform.BACKEND = backend
hooks.add("step_end", report)
sys.exit(main(sys.argv[1:]))
