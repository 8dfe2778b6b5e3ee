"""Checkpoint conversion: Hugging Face and Meta formats in, Hugging Face out.

The reference is transformers itself: a tiny random LlamaForCausalLM with Llama 3.1 RoPE scaling is
saved with `save_pretrained`, imported, and must give the same logits in llamatron; the export must load
in transformers and give them again.
"""

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (a dependency of transformers)

from llamatron import convert  # noqa: E402
from llamatron.cli import main  # noqa: E402
from llamatron.config import config_from_dict, load_config, resolve_model  # noqa: E402
from llamatron.data.indexed import IndexedDatasetWriter  # noqa: E402
from llamatron.errors import LlamatronError  # noqa: E402
from llamatron.models.llama import hf as llama_hf  # noqa: E402
from llamatron.models.llama.model import Transformer, rope_frequencies  # noqa: E402
from llamatron.train import checkpoint as ckpt  # noqa: E402

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _hf_config():
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=512, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(LLAMA31_ROPE), tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_hf_config()).eval()
    # Larger than the default init (std 0.02) so attention is far from uniform and a wrong q/k
    # permutation moves the logits by ~10% (measured), while fp32 noise stays ~1e-6.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    hf_model.save_pretrained(path, max_shard_size="100KB")  # forces several shards + an index
    return path


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    return convert.import_hf(hf_dir, tmp_path_factory.mktemp("imp") / "ckpt", progress=False)


def _load_llamatron(path) -> Transformer:
    """What `eval` and `checkpoint.init_from` do: the model from config.yaml, weights via DCP."""
    cfg = config_from_dict(yaml.safe_load(ckpt.read_checkpoint_config(path)))
    model = Transformer(resolve_model(cfg.model)[1])
    ckpt.load_model_weights(path, model)
    return model.eval()


def _rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --------------------------------------------------------------------------------------------------
# The adapter


def test_permutation_matches_the_index_rule_and_inverts():
    n, hd, dim = 3, 8, 5
    w = torch.randn(n * hd, dim)
    hf = llama_hf.permute_to_hf(w, n)
    for h in range(n):
        for j in range(hd // 2):  # Meta pairs (2j, 2j+1) become HF rows (j, j + hd/2)
            assert torch.equal(hf[h * hd + j], w[h * hd + 2 * j])
            assert torch.equal(hf[h * hd + hd // 2 + j], w[h * hd + 2 * j + 1])
    assert torch.equal(llama_hf.permute_from_hf(hf, n), w)


def test_key_map_covers_the_model_both_ways(hf_model):
    args = llama_hf.args_from_hf_config(_hf_config().to_dict())
    with torch.device("meta"):
        ours = Transformer(args).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == convert.expected_shapes(args)
    hf_names = set(hf_model.state_dict())
    assert {llama_hf.hf_name(k) for k in ours} == hf_names
    assert {llama_hf.llamatron_name(k) for k in hf_names} == set(ours)


def test_rope_frequencies_match_transformers(hf_model):
    """All three Llama 3.1 regimes occur at head_dim 16 (wavelengths 6 to 1e6 positions)."""
    args = llama_hf.args_from_hf_config(_hf_config().to_dict())
    torch.testing.assert_close(rope_frequencies(args), hf_model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------
# Hugging Face -> llamatron -> Hugging Face


def test_import_gives_transformers_logits(hf_model, hf_dir, imported):
    assert len(list(hf_dir.glob("model-*-of-*.safetensors"))) > 2
    model = _load_llamatron(imported)
    # 4096 positions: past 2048, the shortest wavelength that Llama 3.1 scaling slows down.
    tokens = torch.randint(0, 512, (1, 4096), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(tokens), hf_model(tokens).logits
    assert ref.abs().max() > 1.0
    assert _rel_err(ours, ref) < 1e-5


def test_imported_checkpoint_is_a_weights_only_llamatron_checkpoint(imported):
    assert (imported / ".metadata").is_file() and (imported / ckpt.MARKER).is_file()
    assert json.loads((imported / "trainer_state.json").read_text())["weights_only"] is True
    args = convert.checkpoint_model_args(imported)
    assert args == llama_hf.args_from_hf_config(_hf_config().to_dict())
    assert (args.vocab_size, args.max_seq_len, args.ffn_dim) == (512, 131072, 160)
    assert not list(imported.parent.glob(".*.tmp"))  # the staging directory was renamed
    # Checksummed as a trained checkpoint is: every file but the marker, verified at eval and init_from.
    listed = json.loads((imported / ckpt.CHECKSUMS).read_text())["files"]
    assert set(listed) == {p.name for p in imported.iterdir()} - {ckpt.MARKER, ckpt.CHECKSUMS}
    assert ckpt.verify_checkpoint(imported) == sum(f["bytes"] for f in listed.values())


def test_export_loads_in_transformers_and_reimports_bit_exact(hf_model, imported, tmp_path):
    out = convert.export_hf(imported, tmp_path / "hf", max_shard_size="100KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == LLAMA31_ROPE and cfg["rope_theta"] == 500000.0
    assert (cfg["vocab_size"], cfg["max_position_embeddings"], cfg["tie_word_embeddings"]) == (512, 131072, False)

    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ref_sd = hf_model.state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    tokens = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, hf_model(tokens).logits, rtol=0, atol=0)

    again = convert.import_hf(out, tmp_path / "again", progress=False)
    a, b = _load_llamatron(imported).state_dict(), _load_llamatron(again).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_from_import_then_export_the_run(hf_model, imported, tmp_path):
    """checkpoint.init_from takes the imported checkpoint; with lr 0 the run's weights are the
    imported ones, so exporting the run directory gives back the transformers weights exactly."""
    overrides = convert.model_overrides(convert.checkpoint_model_args(imported))
    assert overrides == ["model.size=debug", "model.max_seq_len=131072"]
    from llamatron.train.trainer import train

    cfg = load_config(None, [*overrides, "data.mock=true", "data.seq_len=32", "train.steps=1",
                             "train.global_batch_size=2", "train.micro_batch_size=2", "train.device=cpu",
                             "optim.lr=0", "optim.min_lr=0", "eval.samples=0", f"train.out_dir={tmp_path / 'run'}",
                             f"checkpoint.init_from={imported}"])
    logs = []
    train(cfg, progress=False, log=logs.append)
    assert any("initialised model weights from" in line for line in logs)
    out = convert.export_hf(tmp_path / "run", tmp_path / "hf", progress=False)
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(f))
    ref = hf_model.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_bf16_import_is_accepted_by_eval(hf_model, tmp_path, capsys):
    """A bf16 checkpoint (as released) stays bf16 on import; `llamatron eval` loads it into its fp32
    model and scores windows as transformers does on the same weights."""
    src = tmp_path / "hf16"
    copy = transformers.LlamaForCausalLM(_hf_config())
    copy.load_state_dict(hf_model.state_dict())
    copy.to(torch.bfloat16).save_pretrained(src)
    dst = convert.import_hf(src, tmp_path / "ckpt", progress=False)
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(dst)).read_metadata().state_dict_metadata
    assert md["model.output.weight"].properties.dtype == torch.bfloat16

    seq, n = 64, 4
    tokens = torch.randint(0, 512, (seq * n + 1,), generator=torch.Generator().manual_seed(3))
    with IndexedDatasetWriter(tmp_path / "valid", np.int32) as w:
        w.add_document(tokens.numpy())
    assert main(["eval", "--checkpoint", str(dst), "--data", str(tmp_path / "valid"), "--seq-len", str(seq),
                 "--num-samples", str(n)]) == 0
    got = float(capsys.readouterr().out.split("validation log perplexity:")[1])

    windows = torch.stack([tokens[i * seq: i * seq + seq + 1] for i in range(n)])
    ref_model = copy.float().eval()
    with torch.no_grad():
        logits = ref_model(windows[:, :-1]).logits
    want = F.cross_entropy(logits.reshape(-1, 512), windows[:, 1:].reshape(-1)).item()
    assert abs(got - want) < 1e-3


# --------------------------------------------------------------------------------------------------
# Meta format


def _meta_shards(sd: dict, mp: int) -> list[dict]:
    """Split a full Meta state dict as Meta's model-parallel layers do (REFERENCE C.2): row-parallel
    wo/w2 along dim 1, norms replicated, everything else (embedding included) along dim 0."""
    shards = [{} for _ in range(mp)]
    for name, t in sd.items():
        if name.endswith("norm.weight"):
            parts = [t] * mp
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            parts = t.chunk(mp, dim=1)
        else:
            parts = t.chunk(mp, dim=0)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def _meta_dir(path, mp=2):
    path.mkdir()
    # ffn: int(2*4*64/3) = 170 -> int(0.9*170) = 153 -> 160 (multiple of 32), the debug size's width.
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512, "multiple_of": 32,
              "ffn_dim_multiplier": 0.9, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
    (path / "params.json").write_text(json.dumps(params))
    args = llama_hf.args_from_meta_params(params)
    torch.manual_seed(4)
    model = Transformer(args)
    model.init_weights(seed=4)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i, shard in enumerate(_meta_shards(sd, mp)):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    return sd


def test_meta_model_parallel_import_is_bit_exact(tmp_path):
    sd = _meta_dir(tmp_path / "meta", mp=2)
    dst = convert.import_meta(tmp_path / "meta", tmp_path / "ckpt", progress=False)
    got = _load_llamatron(dst).state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert convert.checkpoint_model_args(dst).max_seq_len == 131072


# --------------------------------------------------------------------------------------------------
# Streaming


def test_writing_a_checkpoint_holds_about_one_tensor(tmp_path):
    """Peak memory while writing ~300 MB of tensors stays near two of the largest (32 MB), not the
    total: DCP asks for each tensor only when it writes it, and drops it after."""
    script = textwrap.dedent(f"""
        import dataclasses, resource, torch
        from llamatron.convert import TensorSpec, expected_shapes, write_llamatron_checkpoint
        from llamatron.models.llama.model import ModelArgs
        def specs(a):
            return [TensorSpec(n, s, torch.float32, lambda s=s: torch.ones(s)) for n, s in expected_shapes(a).items()]
        big = dataclasses.replace(ModelArgs(), dim=1024, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=8192,
                                  ffn_dim=4096)
        small = dataclasses.replace(big, dim=64, n_heads=4, n_layers=1, vocab_size=64, ffn_dim=64)
        write_llamatron_checkpoint({str(tmp_path / 'warm')!r}, specs(small), small, "t", progress=False)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        s = specs(big)
        write_llamatron_checkpoint({str(tmp_path / 'big')!r}, s, big, "t", progress=False)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
        print(grown, sum(t.nbytes for t in s), max(t.nbytes for t in s))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         start_new_session=True).stdout
    grown, total, biggest = map(int, out.split())
    assert total > 9 * biggest
    assert grown < 4 * biggest, (grown, total, biggest)


# --------------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing written


def _copy(hf_dir, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(hf_dir, dst)
    return dst


def _shards(path) -> list[str]:
    return sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _raises(fn, *needles):
    with pytest.raises(LlamatronError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_missing_hf_shard_is_named(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    gone = _shards(src)[1]
    (src / gone).unlink()
    _raises(lambda: convert.import_hf(src, tmp_path / "out", progress=False), gone, "missing shard")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_missing_meta_shard_is_named(tmp_path):
    _meta_dir(tmp_path / "meta", mp=2)
    (tmp_path / "meta" / "consolidated.00.pth").unlink()
    _raises(lambda: convert.import_meta(tmp_path / "meta", tmp_path / "out", progress=False),
            "consolidated.00.pth", "missing shard")


def test_meta_shard_count_mismatch_names_tensor_and_shapes(tmp_path):
    _meta_dir(tmp_path / "meta", mp=2)
    (tmp_path / "meta" / "consolidated.01.pth").unlink()  # the last one: only the shapes can tell
    _raises(lambda: convert.import_meta(tmp_path / "meta", tmp_path / "out", progress=False),
            "tok_embeddings.weight", "[256, 64]", "[512, 64]", "1 consolidated.*.pth shard(s) found")


def test_shape_mismatch_names_tensor_and_both_shapes(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    key = "model.layers.1.self_attn.k_proj.weight"
    fname = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(fname)
    tensors[key] = tensors[key][:16].clone()
    save_file(tensors, fname, metadata={"format": "pt"})
    _raises(lambda: convert.import_hf(src, tmp_path / "out", progress=False), key, "[16, 64]", "[32, 64]")


def test_vocabulary_mismatch_names_tensor_and_both_shapes(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    _edit_config(src, vocab_size=520)
    _raises(lambda: convert.import_hf(src, tmp_path / "out", progress=False),
            "model.embed_tokens.weight", "[512, 64]", "[520, 64]")


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])  # transformers v4 and v5 spellings
def test_unsupported_rope_scaling_type(hf_dir, tmp_path, key):
    src = _copy(hf_dir, tmp_path)
    _edit_config(src, rope_scaling=None, rope_parameters=None)
    _edit_config(src, rope_theta=500000.0, **{key: {"rope_type": "yarn", "factor": 8.0}})
    _raises(lambda: convert.import_hf(src, tmp_path / "out", progress=False), "'yarn'", "'llama3'")


def test_missing_config_key(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path)
    _edit_config(src, hidden_size=None)
    _raises(lambda: convert.import_hf(src, tmp_path / "out", progress=False), "config.json", "'hidden_size'")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text(json.dumps({"dim": 64}))
    _raises(lambda: convert.import_meta(tmp_path / "meta", tmp_path / "out", progress=False),
            "params.json", "'n_heads'")


def test_plain_rope_theta_imports_as_an_override(hf_dir, tmp_path):
    """A Llama checkpoint without llama3 rope scaling (LLaMA-2 style: theta 10000) is expressible:
    the saved config carries the theta and no scaling, and the weights load."""
    src = _copy(hf_dir, tmp_path)
    _edit_config(src, rope_scaling=None, rope_parameters=None)
    _edit_config(src, rope_theta=10000.0)
    dst = convert.import_hf(src, tmp_path / "out", progress=False)
    args = resolve_model(config_from_dict(yaml.safe_load(ckpt.read_checkpoint_config(dst))).model)[1]
    assert args.rope_theta == 10000.0
    assert args.rope_scaling_factor == 0
    _load_llamatron(dst)


def test_pickles_are_never_loaded(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(_hf_config().to_dict()))
    (hf / "pytorch_model.bin").write_bytes(b"not loaded")
    _raises(lambda: convert.import_hf(hf, tmp_path / "out", progress=False), "pytorch_model.bin", "safetensors")

    _meta_dir(tmp_path / "meta", mp=1)
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    shard["norm.weight"] = _Evil()
    torch.save(shard, tmp_path / "meta" / "consolidated.00.pth")
    _raises(lambda: convert.import_meta(tmp_path / "meta", tmp_path / "out", progress=False),
            "consolidated.00.pth", "weights_only=True")
    assert not _Evil.ran


class _Evil:
    ran = False

    def __reduce__(self):
        return (_Evil._run, ())

    @staticmethod
    def _run():
        _Evil.ran = True


def test_destination_and_source_errors(imported, tmp_path):
    _raises(lambda: convert.export_hf(imported, imported, progress=False), "already exists")
    _raises(lambda: convert.export_hf(tmp_path, tmp_path / "out", progress=False), "neither a checkpoint")
    _raises(lambda: convert.convert(imported, tmp_path / "o", "meta", "hf"), "not supported")
    broken = tmp_path / "broken"
    shutil.copytree(imported, broken)
    victim = sorted(broken.glob("__*.distcp"))[3]
    victim.unlink()
    _raises(lambda: convert.export_hf(broken, tmp_path / "out", progress=False), victim.name)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()


# --------------------------------------------------------------------------------------------------
# Command line


def test_cli_import_and_one_line_errors(hf_dir, tmp_path, capsys):
    dst = tmp_path / "ckpt"
    assert main(["convert", "--from", "hf", "--to", "llamatron", str(hf_dir), str(dst), "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "--set model.size=debug --set model.max_seq_len=131072" in out and f"checkpoint.init_from={dst}" in out
    model = _load_llamatron(dst)
    assert model.output.weight.dtype == torch.float32  # the model is fp32; the stored copy is bf16

    src = _copy(hf_dir, tmp_path)
    gone = _shards(src)[-1]
    (src / gone).unlink()
    code = main(["convert", "--from", "hf", "--to", "llamatron", str(src), str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("llamatron convert: error:") and gone in last


# --------------------------------------------------------------------------------------------------
# The published configs (REFERENCE C.1, C.2)

PUBLISHED_8B_CONFIG = {  # meta-llama/Llama-3.1-8B config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": dict(LLAMA31_ROPE), "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0",
    "use_cache": True, "vocab_size": 128256,
}


def test_published_8b_config_both_ways():
    args = llama_hf.args_from_hf_config(PUBLISHED_8B_CONFIG)
    assert convert.model_overrides(args) == ["model.size=llama3.1-8b", "model.max_seq_len=131072"]
    written = llama_hf.hf_config(args, torch.bfloat16)
    for k, v in PUBLISHED_8B_CONFIG.items():
        if k != "transformers_version":
            assert written[k] == v, k


@pytest.mark.parametrize("size,params", [
    ("llama3.1-8b", {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 1024, "ffn_dim_multiplier": 1.3}),
    ("llama3.1-70b", {"dim": 8192, "n_layers": 80, "n_heads": 64, "multiple_of": 4096, "ffn_dim_multiplier": 1.3}),
    ("llama3.1-405b", {"dim": 16384, "n_layers": 126, "n_heads": 128, "multiple_of": 4096, "ffn_dim_multiplier": 1.2}),
])
def test_meta_params_of_the_released_sizes(size, params):
    params = dict(params, n_kv_heads=8, vocab_size=128256, norm_eps=1e-05, rope_theta=500000.0, use_scaled_rope=True)
    args = llama_hf.args_from_meta_params(params)
    from llamatron.models.llama import SIZES

    assert args == dataclasses.replace(SIZES[size], max_seq_len=131072)
    assert llama_hf.args_from_hf_config(llama_hf.hf_config(args, torch.bfloat16)) == args


def test_a_failing_source_read_is_one_error_and_leaves_nothing(tmp_path):
    args = llama_hf.args_from_hf_config(_hf_config().to_dict())

    def load(shape):
        def f():
            if len(shape) == 1:
                raise OSError("read error\nmore detail")
            return torch.zeros(shape)
        return f

    specs = [convert.TensorSpec(n, s, torch.float32, load(s)) for n, s in convert.expected_shapes(args).items()]
    _raises(lambda: convert.write_llamatron_checkpoint(tmp_path / "out", specs, args, "test", progress=False),
            "layers.0.attention_norm.weight", "read error")
    assert list(tmp_path.iterdir()) == []
