"""LoRA: the transform (frozen base, only adapters trained and in the optimizer, step-0 output equals
the base model's, merge == unmerged) and PEFT's adapter format both ways against the real peft and
transformers."""

import pytest
import torch
import yaml

from llamatron.config import OptimConfig, config_from_dict, resolve_model
from llamatron.models.llama import SIZES
from llamatron.models.llama import FAMILY as LLAMA
from llamatron.models.llama.model import Transformer
from llamatron.train import checkpoint as ckpt
from llamatron.train.optim import build_optimizer
from llamatron.transforms.lora import apply_lora, lora_modules, merge_lora, unmerge_lora

torch.set_num_threads(1)


def _model(seed=3):
    model = Transformer(SIZES["debug"])
    model.init_weights(seed=seed)
    return model


def _randomize_adapters(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)


def test_adapters_start_at_the_base_model_and_only_they_train():
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (2, 17))
    model = _model()
    with torch.no_grad():
        base = model(tokens[:, :-1])
    adapted = apply_lora(model, rank=4, alpha=8.0, targets=["attention", "w2"])
    assert len(adapted) == 2 * 5 and "layers.0.feed_forward.w2" in adapted and "layers.0.feed_forward.w1" not in adapted
    assert all(m.lora_A.weight.abs().sum() > 0 for m in lora_modules(model).values())
    with torch.no_grad():
        assert torch.equal(model(tokens[:, :-1]), base)  # B = 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.0), "cpu")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    assert len(trainable) == 2 * len(adapted)
    for _ in range(2):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        assert all((p.grad is None) != p.requires_grad for p in model.parameters())  # frozen: no gradient
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (".lora_" in n), n  # adapters (A and B) changed, nothing else
    assert all(len(opt.state[p]) == 0 for p in model.parameters() if not p.requires_grad)


def test_merged_equals_unmerged():
    torch.manual_seed(0)
    tokens = torch.randint(0, 512, (2, 16))
    model = _model()
    apply_lora(model, rank=4, alpha=4.0, targets=["all"])
    _randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(tokens)
        merge_lora(model)
        merged = model(tokens)
        unmerge_lora(model)
        again = model(tokens)
    assert not torch.allclose(unmerged, _model()(tokens).detach(), atol=1e-4)  # the adapter does something
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# PEFT interop

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An HF Llama (random, larger weights so a wrong permutation shows) and the same weights imported
    with `llamatron convert`."""
    from llamatron import convert

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=512, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}, tie_word_embeddings=False)
    hf_model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0.0, 0.05) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    work = tmp_path_factory.mktemp("peft")
    hf_model.save_pretrained(work / "hf")
    imported = convert.import_hf(work / "hf", work / "ckpt", progress=False)
    return work, imported


def _llamatron(imported):
    cfg = config_from_dict(yaml.safe_load(ckpt.read_checkpoint_config(imported)))
    args = resolve_model(cfg.model)[1]
    model = Transformer(args)
    ckpt.load_model_weights(imported, model)
    return model.eval(), args


def _hf(work):
    return transformers.LlamaForCausalLM.from_pretrained(work / "hf").eval()


def test_peft_loads_a_llamatron_adapter(base, tmp_path):
    from llamatron.transforms.peft_format import CONFIG, WEIGHTS, save_peft_adapter

    work, imported = base
    model, args = _llamatron(imported)
    apply_lora(model, rank=4, alpha=8.0, targets=["all"])
    _randomize_adapters(model)
    save_peft_adapter(model, LLAMA, args, tmp_path / "adapter")
    assert (tmp_path / "adapter" / CONFIG).is_file() and (tmp_path / "adapter" / WEIGHTS).is_file()
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    tokens = torch.randint(0, 512, (2, 12))
    peft_model = peft.PeftModel.from_pretrained(_hf(work), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs = model(tokens), peft_model(tokens).logits
        plain = _hf(work)(tokens).logits
    assert (theirs - plain).abs().max() > 1e-3  # the adapter changed the logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_llamatron_loads_a_peft_adapter(base, tmp_path):
    from llamatron.transforms.peft_format import load_peft_adapter

    work, imported = base
    torch.manual_seed(1)
    hf_model = peft.get_peft_model(_hf(work), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj",
                                                                                                   "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in hf_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    hf_model.save_pretrained(tmp_path / "adapter")
    model, args = _llamatron(imported)
    load_peft_adapter(model, tmp_path / "adapter", LLAMA, args)
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_modules(model)}) == ["w2", "wk", "wq", "wv"]
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model.eval()(tokens).logits, rtol=1e-4, atol=1e-4)
