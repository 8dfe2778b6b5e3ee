from pathlib import Path

import pytest

from llamatron.config import config_from_dict, config_to_dict, dump_config, load_config, resolve_model, validate_config
from llamatron.errors import LlamatronError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_toml_yaml_and_overrides(tmp_path):
    t = write(tmp_path, "a.toml", '[model]\nsize = "debug"\nn_layers = 3\n[train]\nsteps = 7\n[data]\nmock = true\n')
    cfg = load_config(t, ["train.steps=9", "optim.lr=1e-2", "data.train=[a, b]", "train.compile=true"])
    assert cfg.model.overrides == {"n_layers": 3} and cfg.train.steps == 9 and cfg.optim.lr == 0.01
    assert cfg.data.train == ["a", "b"] and cfg.train.compile is True
    family, args = resolve_model(cfg.model)
    assert family.name == "llama" and args.n_layers == 3 and args.dim == 64
    y = write(tmp_path, "a.yaml", "model:\n  size: debug\ndata:\n  mock: true\ntrain:\n  global_batch_size: 4\n  micro_batch_size: 2\n")
    cfg = load_config(y)
    assert cfg.train.global_batch_size == 4
    # The resolved config round-trips through its YAML dump.
    import yaml
    assert config_to_dict(config_from_dict(yaml.safe_load(dump_config(cfg)))) == config_to_dict(cfg)


def test_presets_load():
    cfg = load_config("demo", ["data.train=x"])
    assert cfg.model.size == "tiny"


PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "llamatron" / "presets").glob("*.toml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_passes_validation(preset):
    """Every shipped preset is a valid config as it stands (data left to the user: mock tokens here)."""
    extra = ["mlperf.division=open"] if preset == "mlperf-llama31-405b" else []  # closed needs Meta's weights
    cfg = load_config(preset, ["data.mock=true", *extra])
    validate_config(cfg)
    assert cfg.model.size


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
        (["trian.steps=3"], "unknown config section 'trian'"),
        (["train.steps=three"], "'train.steps'"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "'train.global_batch_size': 10 must be divisible"),
        (["model.n_kv_heads=3"], "'model.n_kv_heads': n_heads 4 must be divisible by n_kv_heads 3"),
        (["model.size=llama9"], "unknown size 'llama9'"),
        (["model.n_expertz=3"], "'model.n_expertz': the llama family has no such setting"),
        (["model.n_layers=two"], "'model.n_layers': 'two' is not an integer"),
        (["data.seq_len=4096"], "exceeds the model's max_seq_len"),
        (["optim.min_lr=1", "optim.lr=0.1"], "'optim.min_lr'"),
        (["steps=3"], "expected section.key=value"),
        (["train.compile_tuning=true"], "'train.compile_tuning'"),
        (["train.fp8_fast_accum=[output,grad_wieght]"], "'train.fp8_fast_accum': must list some of output, grad_input"),
    ],
)
def test_config_errors_name_the_key(overrides, needle):
    with pytest.raises(LlamatronError) as e:
        load_config(None, ["model.size=debug", "data.mock=true", *overrides])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file_names_file(tmp_path):
    p = write(tmp_path, "bad.toml", "[train]\nbogus = 1\n")
    with pytest.raises(LlamatronError, match=r"bad.toml: unknown config key 'train.bogus'"):
        load_config(p)


def test_missing_data_rejected():
    with pytest.raises(LlamatronError, match="data.train"):
        load_config(None, [])


@pytest.mark.parametrize(
    "sets, lora, expected",
    [
        ([], False, False),  # BF16: the tuning gained nothing there, only ~100 s of compile
        (["train.fp8=tensorwise"], False, True),  # FP8 training: the step it was measured to speed up
        (["train.fp8=rowwise"], False, True),
        (["train.fp8=tensorwise"], True, False),  # LoRA's frozen FP8 bases: not measured
        (["train.fp8=tensorwise", "train.compile_tuning=false"], False, False),  # said: kept
        (["train.compile_tuning=true"], False, True),
    ],
)
def test_compile_tuning_unset_is_on_for_fp8_training_only(sets, lora, expected):
    from llamatron.transforms.compile import compile_tuning

    cfg = load_config(None, ["model.size=debug", "data.mock=true", "train.compile=true", *sets])
    assert compile_tuning(cfg.train, lora=lora) is expected


def test_compile_tuning_tunes_every_compiled_block_and_the_final_norm(monkeypatch):
    """train.compile_tuning passes inductor's coordinate-descent tuning to each block's compile and the
    final norm's; without it the compiles take no options (a test backend may not accept any)."""
    import torch
    from torch import nn

    from llamatron.transforms import compile as compile_transform

    cfg = load_config(None, ["model.size=debug", "data.mock=true", "train.compile=true", "train.compile_tuning=true"])
    family, args = resolve_model(cfg.model)
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    for tuning in (True, False):
        calls.clear()
        with torch.device("meta"):
            model = family.build(args)
        compile_transform.apply_compile(model, tuning=tuning)
        assert len(calls) == args.n_layers + 1  # every block, then the final norm
        expected = {"coordinate_descent_tuning": True} if tuning else None
        assert all(kw.get("options") == expected for _, kw in calls), calls


@pytest.mark.parametrize("fp8, expected", [("none", False), ("tensorwise", True)])
def test_the_trainers_layout_compiles_with_the_tuning_its_setting_resolves_to(monkeypatch, fp8, expected):
    """parallelize hands apply_compile what compile_tuning resolves train.compile_tuning (unset) to."""
    import torch

    from llamatron.parallel import parallelize as layout_module
    from llamatron.parallel.dims import ParallelDims

    cfg = load_config(None, ["model.size=debug", "data.mock=true", "train.compile=true", f"train.fp8={fp8}"])
    family, args = resolve_model(cfg.model)
    seen = []
    monkeypatch.setattr(layout_module, "apply_compile", lambda part, tuning: seen.append(tuning))
    with torch.device("meta"):
        model = family.build(args)
    layout_module.parallelize(model, family, cfg.train, ParallelDims())
    assert seen == [expected]
