"""The parallel layout without processes: config validation, degrees, stage split, CP chunks,
Megatron's sampler over data-parallel ranks, and the memory estimate."""

import dataclasses

import pytest
import torch

from llamatron.config import load_config, validate_config
from llamatron.data.sampler import accumulation_steps, micro_batch_indices
from llamatron.errors import LlamatronError
from llamatron.models.llama import SIZES
from llamatron.models import count_parameters
from llamatron.models.llama.model import Transformer
from llamatron.parallel.context_parallel import chunk_positions
from llamatron.parallel.dims import ParallelDims
from llamatron.parallel.memory import GiB, block_parameters, estimate_memory

BASE = ["model.size=debug", "data.mock=true", "data.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=1"]


def _cfg(*overrides):
    return load_config(None, [*BASE, *overrides])


@pytest.mark.parametrize(
    "overrides,world,needle",
    [
        (["parallel.tp=3"], None, "'parallel.tp': n_heads 4 must be divisible by tp 3"),
        (["parallel.tp=4"], None, "'parallel.tp': n_kv_heads 2 must be divisible by tp 4"),
        (["parallel.pp=4"], None, "'parallel.pp': n_layers 2 must be divisible by pp x pp_virtual_stages = 4 x 1"),
        (["parallel.pp=2", "parallel.pp_virtual_stages=2"], None, "n_layers 2 must be divisible by pp x pp_virtual_stages = 2 x 2"),
        (["parallel.cp=3"], None, "'parallel.cp': data.seq_len 32 must be divisible by 2 x cp = 6"),
        (["parallel.pp_virtual_stages=2", "parallel.pp_schedule=1f1b", "model.n_layers=4"], None,
         "'parallel.pp_schedule': 1f1b runs one stage per rank"),
        (["parallel.pp_schedule=zigzag"], None, "'parallel.pp_schedule': must be one of"),
        (["parallel.dp_shard=0"], None, "'parallel.dp_shard': must be >= 1, or -1"),
        (["parallel.tp=0"], None, "'parallel.tp': must be >= 1"),
        (["parallel.dp_shard=2", "parallel.tp=2"], 8, "'parallel.dp_shard': dp_replicate x dp_shard x cp x tp x pp = 1 x 2 x 1 x 2 x 1 = 4, but the world size is 8"),
        (["parallel.tp=2"], 3, "'parallel.dp_shard': -1 fills the world size 3"),
        (["parallel.dp_replicate=3"], None, "'train.global_batch_size': 8 must be divisible by micro_batch_size x data-parallel size = 1 x 3"),
        ([], 16, "'train.global_batch_size': 8 must be divisible by micro_batch_size x data-parallel size = 1 x 16"),
        (["parallel.pp=2", "train.global_batch_size=4", "train.micro_batch_size=2"], 4,
         "'train.global_batch_size': the pipeline needs at least pp = 2 micro-batches"),
    ],
)
def test_layout_errors_name_the_key(overrides, world, needle):
    with pytest.raises(LlamatronError) as e:
        validate_config(load_config(None, [*BASE, *overrides]) if world is None else _cfg_unvalidated(overrides), world)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def _cfg_unvalidated(overrides):
    # Layout checks that need the world size pass at load time (the world size is unknown there).
    return load_config(None, [*BASE, *overrides])


def test_dp_shard_fills_the_world_and_mesh_names():
    cfg = _cfg("parallel.tp=2", "parallel.pp=2", "model.n_layers=2")
    validate_config(cfg, 16)
    d = ParallelDims.from_config(cfg.parallel, 16)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.tp, d.pp, d.dp) == (1, 4, 1, 2, 2, 4)
    assert d.fsdp_enabled
    assert "dp_shard 4, tp 2, pp 2" in d.describe()
    assert not ParallelDims.from_config(_cfg("parallel.tp=2").parallel, 2).fsdp_enabled  # dp_shard fills to 1
    assert ParallelDims.from_config(_cfg("parallel.cp=2").parallel, 2).fsdp_enabled  # FSDP shards over CP too


def test_pipeline_split_keeps_names_and_halves():
    from llamatron.parallel.pipeline import split_stage, stage_ids

    with torch.device("meta"):
        model = Transformer(dataclasses.replace(SIZES["debug"], n_layers=4))
    assert stage_ids(1, 2, 2) == [1, 3]  # loop-style: rank 1 of 2 holds stages 1 and 3 of 4
    parts = [split_stage(model, i, 4) for i in range(4)]
    assert [list(p.layers) for p in parts] == [["0"], ["1"], ["2"], ["3"]]
    assert parts[0].tok_embeddings is not None and parts[0].output is None
    assert parts[3].tok_embeddings is None and parts[3].output is not None and parts[3].norm is not None
    names = [n for p in parts for n, _ in p.named_parameters()]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert sum(count_parameters(p) for p in parts) == count_parameters(model)


def test_stage_and_shard_initialisation_match_the_whole_model():
    """Each parameter's initial value depends on (seed, name) only: a stage, or a shard, gets the
    values the whole model has."""
    from llamatron.parallel.parallelize import materialize
    from llamatron.parallel.pipeline import split_stage

    args = dataclasses.replace(SIZES["debug"], n_layers=4)
    whole = Transformer(args)
    whole.init_weights(seed=5)
    with torch.device("meta"):
        meta = Transformer(args)
    stage = split_stage(meta, 2, 4)
    materialize(stage, torch.device("cpu"), seed=5)
    for name, p in stage.named_parameters():
        assert torch.equal(p, whole.get_parameter(name)), name
    torch.testing.assert_close(stage.rope_cos, whole.rope_cos)


def test_context_parallel_chunks_cover_the_sequence_head_and_tail():
    cp, seq = 4, 32
    chunks = [chunk_positions(r, cp, seq) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(chunks)).values, torch.arange(seq))
    assert chunks[0].tolist() == [0, 1, 2, 3, 28, 29, 30, 31]
    # Load balance: under the causal mask each rank's queries see the same number of keys.
    work = [int((c + 1).sum()) for c in chunks]
    assert len(set(work)) == 1


def test_sampler_ranks_read_disjoint_consecutive_samples():
    """Megatron's order: the data-parallel ranks together read exactly the global batch, whatever
    the data-parallel size, so the samples of a step do not depend on the layout."""
    gbs, mbs = 16, 2
    for dp in (1, 2, 4, 8):
        seen = [i for r in range(dp) for m in range(accumulation_steps(gbs, mbs, dp))
                for i in micro_batch_indices(3, m, gbs, mbs, r, dp)]
        assert sorted(seen) == list(range(3 * gbs, 4 * gbs))


def test_memory_estimate_8b_fsdp():
    a = SIZES["llama3.1-8b"]
    est = estimate_memory(a, 8192, 1, dp_shard=2)
    n = 8_030_261_248
    assert est.weights == pytest.approx(4 * n / 2) and est.gradients == pytest.approx(4 * n / 2)
    assert est.optimizer == pytest.approx(8 * n / 2)
    # Activations: every block saves its tensors for 8192 tokens, bf16 residual under FSDP; the final
    # norm its fp32 input copy and bf16 output, the fused loss the bf16 gradient of its input.
    d, f = a.dim, a.ffn_dim
    per_token = 6 * 2 * d + 5 * 2 * d + 4 * 2 * f
    head = (4 + 2 + 2) * d
    assert est.activations == pytest.approx(32 * 8192 * per_token + 8192 * head)
    assert 100 * GiB < est.total < 140 * GiB
    # One micro-batch per step: the gradients fill what backward frees, so they are not at the peak.
    parts = est.weights + est.gradients + est.optimizer + est.working + est.activations + est.logits
    assert est.reused == est.gradients and est.total == pytest.approx(parts - est.gradients)
    assert estimate_memory(a, 8192, 1, dp_shard=2, n_microbatches=2).total == pytest.approx(parts)
    # Activation checkpointing of all blocks keeps only their inputs plus one block's activations.
    ac = estimate_memory(a, 8192, 1, dp_shard=2, activation_checkpointing=True)
    assert ac.activations == pytest.approx(32 * 8192 * 2 * d + 8192 * per_token + 8192 * head)
    # TP and pipelining divide what each rank holds; FSDP over more ranks divides the states.
    assert estimate_memory(a, 8192, 1, dp_shard=8).optimizer == pytest.approx(est.optimizer / 4)
    tp = estimate_memory(a, 8192, 1, tp=2, fsdp=False)
    # ... all but the five autocast copies of the normalised inputs of wq/wk/wv and w1/w3, gathered
    # along the sequence for the column-parallel linears and kept whole on every rank, and the output
    # layer's gathered input.
    gathered = 32 * 8192 * 5 * 2 * d + 8192 * 2 * d
    assert tp.activations == pytest.approx((estimate_memory(a, 8192, 1, fsdp=False).activations + gathered) / 2)
    pp = estimate_memory(a, 8192, 1, pp=4, n_microbatches=8, fsdp=False)
    assert pp.weights < estimate_memory(a, 8192, 1, fsdp=False).weights / 3
    assert block_parameters(a) * 32 + 2 * a.vocab_size * a.dim + a.dim == n


def test_memory_estimate_of_a_bf16_residual_stream():
    """train.bf16_residual on one GPU under autocast: compiled, 2 bytes a value rather than 4 in the
    block input each block keeps and in the final norm's input; eager only the final norm's input
    changes (the eager norms keep fp32 upcasts of a bf16 stream too); under FSDP no change."""
    a = SIZES["llama3.1-8b"]
    for compiled, per_block in ((True, 2 * a.dim), (False, 0)):
        fp32, bf16 = (estimate_memory(a, 8192, 1, fsdp=False, compiled=compiled, bf16_residual=r) for r in (False, True))
        assert fp32.activations - bf16.activations == pytest.approx(32 * 8192 * per_block + 8192 * 2 * a.dim)
    assert estimate_memory(a, 8192, 1, dp_shard=2, bf16_residual=True).total == estimate_memory(a, 8192, 1, dp_shard=2).total


def test_weights_cast_once_are_counted_whether_their_blocks_are_checkpointed_or_not():
    """train.cast_weights_once keeps every block's bf16 copy between steps: on one GPU without checkpointing
    the estimate is what autocast's kept casts already were; compiled and checkpointed, where autocast's
    casts are one block's temporaries, the copies add 2 bytes a block parameter; FP8 layers keep E4M3 ones."""
    a = SIZES["llama3.1-8b"]
    plain = estimate_memory(a, 8192, 1, n_microbatches=4, compiled=True)
    assert estimate_memory(a, 8192, 1, n_microbatches=4, compiled=True, cast_once=True).total == pytest.approx(plain.total)
    ac = dict(n_microbatches=4, compiled=True, activation_checkpointing=True)
    ac_plain, ac_once = estimate_memory(a, 8192, 1, **ac), estimate_memory(a, 8192, 1, **ac, cast_once=True)
    blocks = 2 * block_parameters(a)
    assert ac_once.working == pytest.approx(plain.working) and ac_once.total - ac_plain.total > 0.9 * blocks * (a.n_layers - 1) / a.n_layers
    fp8 = dict(n_microbatches=4, compiled=True, fp8="tensorwise")
    assert estimate_memory(a, 8192, 1, **fp8, cast_once=True).working > estimate_memory(a, 8192, 1, **fp8).working
