"""LoRA and QLoRA: only adapters train, the wrapped model starts as the base, merge/unmerge,
adapter save/load (token rows, a grown vocabulary, the base's fingerprint), learning-rate groups,
pattern errors, QLoRA training on a quantized base, tied heads untouched."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from scratchlm.checkpoint import base_fingerprint, load_adapters, save_adapters
from scratchlm.config import TrainConfig, model_config
from scratchlm.errors import UserError
from scratchlm.model import build_model, resize_embeddings
from scratchlm.model.lora import (
    LoRALinear,
    adapters_disabled,
    apply_lora,
    count_parameters,
    default_targets,
    lora_state_dict,
    merge_lora,
    prepare_qlora,
    train_token_rows,
)
from scratchlm.model.quant import QuantLinear, weight_bytes
from scratchlm.train.optim import make_optimizer, param_groups


def tiny(arch: str, seed: int = 0, **kw) -> nn.Module:
    base = dict(arch=arch, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False)
    base.update(kw)
    torch.manual_seed(seed)
    return build_model(model_config(**base))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 64, (4, 16), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def train(model: nn.Module, steps: int, lr: float = 1e-2) -> list[float]:
    # every parameter goes to the optimizer: freezing alone must keep the base fixed
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    idx, tgt = batch()
    losses = []
    for _ in range(steps):
        _, loss = model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_only_adapters_train_and_the_base_is_unchanged_bit_for_bit(arch):
    model = tiny(arch)
    names = apply_lora(model, default_targets(model), r=4, alpha=8)
    assert len(names) == (4 if arch == "gpt" else 7) * 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    base = base_state(model)
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    train(model, 3)  # B gets a gradient at step 1, A (through B) from step 2
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, base[k]), k
    for k, v in lora_state_dict(model).items():
        assert not torch.equal(v, adapters[k]), k


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_the_wrapped_model_starts_exactly_as_the_base(arch):
    model = tiny(arch)
    idx, _ = batch()
    with torch.no_grad():
        ref, _ = model(idx)
        apply_lora(model, default_targets(model))
        out, _ = model(idx)
    assert torch.equal(out, ref)  # B = 0: the update is exactly zero


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_adapters_disabled_gives_the_base_and_then_the_adapted_model_back(arch):
    model = tiny(arch)
    idx, _ = batch()
    with torch.no_grad():
        ref, _ = model(idx)
    apply_lora(model, default_targets(model), r=4, alpha=8)
    train(model, 3)
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    with torch.no_grad():
        adapted, _ = model(idx)
        with adapters_disabled(model) as same:
            off, _ = same(idx)
        back, _ = model(idx)
    assert not torch.allclose(adapted, ref)
    assert torch.equal(off, ref) and torch.equal(back, adapted)
    assert all(torch.equal(v, adapters[k]) for k, v in lora_state_dict(model).items())
    next(m for m in model.modules() if isinstance(m, LoRALinear)).merge()
    with pytest.raises(UserError, match="merged"), adapters_disabled(model):
        pass


def test_merge_and_unmerge_agree_and_restore_the_base():
    model = tiny("llama")
    apply_lora(model, ["*wq", "*wv", "w2"], r=4, alpha=16)
    train(model, 3)
    model.eval()
    base = base_state(model)
    idx, _ = batch(2)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    with torch.no_grad():
        unmerged, _ = model(idx)
        for m in layers:
            m.merge()
        merged, _ = model(idx)
        assert not torch.equal(model.layers[0].attention.wq.base.weight, base["layers.0.attention.wq.base.weight"])
        for m in layers:
            m.unmerge()
        again, _ = model(idx)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, unmerged, rtol=0, atol=1e-6)
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            torch.testing.assert_close(v, base[k], rtol=0, atol=1e-7)
    with pytest.raises(UserError, match="not merged"):
        layers[0].unmerge()


def test_merge_lora_gives_back_the_plain_architecture():
    model = tiny("gpt")
    apply_lora(model, default_targets(model))
    train(model, 2)
    model.eval()
    idx, _ = batch(2)
    with torch.no_grad():
        ref, _ = model(idx)
        assert merge_lora(model) == 8
        out, _ = model(idx)
    assert type(model.h[0].attn.c_attn) is nn.Linear
    assert set(model.state_dict()) == set(tiny("gpt").state_dict())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_save_and_load_reproduce_the_outputs(tmp_path):
    model = tiny("gpt")
    fp = base_fingerprint(model)
    apply_lora(model, ["attn.c_attn", "mlp.c_fc"], r=4, alpha=8)
    train(model, 3)
    file = save_adapters(model, tmp_path / "run" / "adapters.safetensors", base="BASE", base_fingerprint=fp,
                         meta={"note": "test"})
    assert file.is_file() and {p.name for p in file.parent.iterdir()} == {"adapters.safetensors", "adapters.json"}
    record = json.loads((file.parent / "adapters.json").read_text())
    assert record["r"] == 4 and record["alpha"] == 8 and record["dropout"] == 0 and record["targets"] == [
        "h.0.attn.c_attn", "h.0.mlp.c_fc", "h.1.attn.c_attn", "h.1.mlp.c_fc"]
    assert (record["base"], record["base_fingerprint"], record["quant_bits"]) == ("BASE", fp, 0)
    assert record["token_ids"] == [] and record["vocab_size"] == record["base_vocab_size"] == 64
    assert record["meta"] == {"note": "test"}
    # only A and B: (r, 32) + (96, r) and (r, 32) + (128, r) per layer, in fp32
    assert file.stat().st_size < 2 * 4 * 4 * (32 + 96 + 32 + 128) + 2000

    fresh = tiny("gpt")
    loaded = load_adapters(fresh, tmp_path / "run")  # the run folder names its adapters too
    assert loaded["meta"]["note"] == "test"
    idx, _ = batch(2)
    with torch.no_grad():  # the same layers, weights and operations: bit for bit
        torch.testing.assert_close(fresh(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert count_parameters(fresh) == count_parameters(model)


def test_token_rows_train_and_every_other_row_stays_bit_for_bit(tmp_path):
    """Untied head, weight decay on, the project's fused AdamW: only the chosen rows of the
    embedding and of the head move; the adapters carry them (and the rows a grown vocabulary
    added), and a fresh base plus the adapters is the trained model exactly."""
    base = tiny("llama", tie_embeddings=False)
    fp = base_fingerprint(base)
    model = tiny("llama", tie_embeddings=False)
    resize_embeddings(model, 66)  # as sft does when the tokenizer gains two specials
    apply_lora(model, ["wq", "w2"], r=4)
    tables = train_token_rows(model, [3, 65])
    assert [n for n, _ in tables] == ["tok_embeddings.weight", "output.weight"]
    # per layer: wq 4·(32 + 32), w2 (32 <- 128 hidden) 4·(128 + 32); plus 2 rows of 32 in each of the 2 tables
    assert count_parameters(model)[0] == 2 * (4 * 64 + 4 * 160) + 2 * 2 * 32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.1))
    assert {g["weight_decay"] for g in opt.param_groups if any(p is tables[1][1] for p in g["params"])} == {0.0}
    idx, tgt = batch()
    idx[:, 0], idx[:, 1], tgt[:, 0] = 65, 3, 3  # both trained rows are read and written
    for _ in range(3):
        _, loss = model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for name, p in tables:
        moved = (p.detach() != before[name]).any(dim=1).nonzero().flatten().tolist()
        assert moved == [3, 65], name

    file = save_adapters(model, tmp_path / "a.safetensors", base_fingerprint=fp, base_vocab_size=64)
    assert json.loads((tmp_path / "a.json").read_text())["token_ids"] == [3, 64, 65]  # trained + added
    fresh = tiny("llama", tie_embeddings=False)
    load_adapters(fresh, file)
    assert fresh.config.vocab_size == 66
    with torch.no_grad():  # identical operations: bit for bit
        torch.testing.assert_close(fresh(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_optimizer_groups_scale_the_adapters_learning_rate():
    model = tiny("llama")
    apply_lora(model, ["wq"], r=4)
    train_token_rows(model, range(64))
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.lr_scale = 5.0
    model.tok_embeddings.weight.lr_scale = 2.0
    groups = {(g["weight_decay"], g["lr_scale"]): len(g["params"]) for g in param_groups(model, 0.1) if g["params"]}
    assert groups == {(0.1, 5.0): 4, (0.0, 2.0): 1}  # A and B of two layers; the tied table is never decayed


def test_loading_onto_the_wrong_base_names_the_problem(tmp_path):
    model = tiny("gpt")
    apply_lora(model, ["c_attn"], r=4)
    save_adapters(model, tmp_path / "a.safetensors")
    wider = tiny("gpt", n_embd=64)
    with pytest.raises(UserError, match=r"h\.0\.attn\.c_attn\.lora_A"):
        load_adapters(wider, tmp_path / "a.safetensors")
    with pytest.raises(UserError, match="no layer 'h.0.attn.c_attn'"):
        load_adapters(tiny("llama"), tmp_path / "a.json")

    fp_model = tiny("gpt")
    fp = base_fingerprint(fp_model)
    apply_lora(fp_model, ["c_attn"], r=4)
    train(fp_model, 2)
    save_adapters(fp_model, tmp_path / "b.safetensors", base="runs/base", base_fingerprint=fp)
    with pytest.raises(UserError, match=r"another base model \(fingerprint mismatch\).*runs/base"):
        load_adapters(tiny("gpt", seed=5), tmp_path / "b.safetensors")
    with pytest.raises(UserError, match="no LoRA adapters here"):
        load_adapters(tiny("gpt"), tmp_path / "nowhere.safetensors")
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes())  # another save's tensors
    with pytest.raises(UserError, match="SHA-256 mismatch"):
        load_adapters(tiny("gpt"), tmp_path / "b.safetensors")
    with pytest.raises(UserError, match=r"must end in \.safetensors"):
        save_adapters(fp_model, tmp_path / "folder")


def test_patterns_that_match_nothing_are_a_user_error():
    model = tiny("llama")
    with pytest.raises(UserError, match=r"\['c_attn', '\*q_proj'\].*layers\.0\.attention\.wq"):
        apply_lora(model, ["c_attn", "*q_proj"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with pytest.raises(UserError, match="match no linear layer"):
        prepare_qlora(model, targets=["nothing"])
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # failed before quantizing
    apply_lora(model, ["wq"])
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model, ["wk"])


def test_qlora_trains_on_a_frozen_quantized_base(tmp_path):
    model = tiny("llama")
    names = prepare_qlora(model, bits=4, group_size=32, r=8, alpha=16)
    assert all(isinstance(model.get_submodule(n).base, QuantLinear) for n in names)
    assert type(model.output) is nn.Linear and model.output.weight is model.tok_embeddings.weight
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    embedding = model.tok_embeddings.weight.clone()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    idx, tgt = batch()
    losses = []
    for step in range(20):
        _, loss = model(idx, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 1:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert torch.equal(model.tok_embeddings.weight, embedding)

    # the quantized base cannot be merged into; dequantized first, it can
    layer = model.get_submodule(names[0])
    with pytest.raises(UserError, match="quantized"):
        layer.merge()

    # save -> load onto a fresh full-precision base re-quantizes it identically
    save_adapters(model, tmp_path / "q.safetensors")
    fresh = tiny("llama")
    load_adapters(fresh, tmp_path / "q.safetensors")
    assert isinstance(fresh.layers[0].attention.wq.base, QuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx)[0], model(idx)[0], rtol=0, atol=0)
        ref, _ = model(idx)
        merge_lora(model, dequantize=True)
        torch.testing.assert_close(model(idx)[0], ref, rtol=0, atol=1e-5)


def test_tied_embedding_and_head_are_untouched_by_lora_training():
    model = tiny("gpt")
    wte = model.wte.weight.detach().clone()
    apply_lora(model, default_targets(model))
    train(model, 3)
    assert model.lm_head.weight is model.wte.weight
    assert torch.equal(model.wte.weight, wte)
    assert not model.wte.weight.requires_grad


def test_parameter_and_memory_accounting_full_lora_qlora():
    full = tiny("llama", n_embd=64, ffn_hidden=192)
    n_full = sum(p.numel() for p in full.parameters())
    assert count_parameters(full) == (n_full, n_full)

    lora = tiny("llama", n_embd=64, ffn_hidden=192)
    apply_lora(lora, default_targets(lora), r=8)
    # per layer: wq, wk, wv, wo 8·(64+64) each; w1, w3 8·(64+192); w2 8·(192+64)
    per_layer = 4 * 8 * 128 + 3 * 8 * 256
    assert count_parameters(lora) == (2 * per_layer, n_full + 2 * per_layer)

    qlora = tiny("llama", n_embd=64, ffn_hidden=192)
    prepare_qlora(qlora, bits=4, group_size=64, r=8)
    assert count_parameters(qlora) == count_parameters(lora)
    wb_full, wb_q = weight_bytes(full), weight_bytes(qlora)
    linear_fp32 = 2 * (4 * 64 * 64 + 3 * 64 * 192) * 4
    assert wb_q.quantized_fp32 == linear_fp32
    assert wb_q.quantized == pytest.approx(linear_fp32 / 8 * (1 + 2 / 64 * 2), rel=1e-9)  # 0.5 B + 2 B / 64
    assert wb_q.total < wb_full.total / 2
