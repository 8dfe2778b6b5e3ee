"""torch.compile as inductor partitions it, without inductor's code generation: for tests of what a
compiled block saves for backward.

What a compiled block keeps for backward is decided before any kernel exists: AOTAutograd traces the
joint forward-backward graph with inductor's decompositions, inductor's joint-graph passes rewrite it,
and its min-cut partitioner (`compiler="inductor"`) chooses the forward outputs backward reads. This
backend runs those same steps and then the two partitioned graphs op by op, which skips the C++/Triton
compilation (tens of seconds per block on a CPU) and lets a TorchDispatchMode see every allocation.
`tests/test_plan.py` checks, slowly, that it saves exactly what inductor does.
"""

from __future__ import annotations

import functools


@functools.cache
def inductor_partitioner():
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    def run_graph(gm, example_inputs):
        return make_boxed_func(gm.forward)

    partition = getattr(compile_fx, "partition_fn", None)
    if partition is None:  # older torch: the partitioner inductor calls, without its joint-graph passes
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        partition = functools.partial(min_cut_rematerialization_partition, compiler="inductor")
    return aot_autograd(fw_compiler=run_graph, bw_compiler=run_graph, partition_fn=partition,
                        decompositions=select_decomp_table())
