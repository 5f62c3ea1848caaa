"""HF MoE models <-> our MoE: tiny random Mixtral, Qwen2-MoE and Qwen3-MoE models imported with
equal logits (fp32, 1e-5), our MoE checkpoints exported to folders `AutoModelForCausalLM` loads
with no custom code and equal logits (and imported back), both expert layouts (per-expert files,
transformers 5's fused tensors), and the refusals: a gated shared expert, irregular MoE layers,
a dense checkpoint under an MoE config and the reverse."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from scratchlm.checkpoint import find_checkpoint, load_model_for_inference
from scratchlm.config import load_config, switch_arch
from scratchlm.convert import export_hf, import_hf
from scratchlm.errors import UserError
from tests.helpers import VOCAB, assert_logits_close, hf_folder, ids, our_checkpoint, randomize

transformers = pytest.importorskip("transformers")
# HF builds the zero-width shared expert a Qwen2-MoE export has when our model has none
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")

SIZES = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=16, rms_norm_eps=1e-5)


def mixtral(**kw):
    cfg = transformers.MixtralConfig(**{**SIZES, "intermediate_size": 24, "num_local_experts": 4, **kw})
    return transformers.MixtralForCausalLM(cfg)


def qwen2_moe(**kw):
    cfg = transformers.Qwen2MoeConfig(**{**SIZES, "intermediate_size": 40, "moe_intermediate_size": 24,
                                         "shared_expert_intermediate_size": 48, "num_experts": 4,
                                         "num_experts_per_tok": 2, **kw})
    return transformers.Qwen2MoeForCausalLM(cfg)


def qwen3_moe(**kw):
    cfg = transformers.Qwen3MoeConfig(**{**SIZES, "intermediate_size": 40, "moe_intermediate_size": 24,
                                         "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 8, **kw})
    return transformers.Qwen3MoeForCausalLM(cfg)


def zero_shared_gates(model):
    for layer in model.model.layers:
        if hasattr(layer.mlp, "shared_expert_gate"):
            torch.nn.init.zeros_(layer.mlp.shared_expert_gate.weight)
    return model


# name -> (random HF model factory, the ModelConfig fields the import must produce)
IMPORTS = {
    "mixtral-top2-e4-gqa": (lambda: mixtral(), dict(n_experts=4, n_active_experts=2, expert_hidden=24,
                                                    router_norm_topk=True, n_kv_head=2, tie_embeddings=False)),
    "mixtral-top1-e8-tied-window4": (lambda: mixtral(num_local_experts=8, num_experts_per_tok=1,
                                                     tie_word_embeddings=True, sliding_window=4),
                                     dict(n_experts=8, n_active_experts=1, tie_embeddings=True, sliding_window=4)),
    "qwen3moe-top2-e8-renorm-first-dense": (
        lambda: qwen3_moe(num_hidden_layers=3, num_experts=8, norm_topk_prob=True, mlp_only_layers=[0]),
        dict(n_experts=8, qk_norm=True, router_norm_topk=True, moe_first_dense=1, moe_every=1, ffn_hidden=40)),
    "qwen3moe-top1-e4-raw-weights-tied": (
        lambda: qwen3_moe(num_experts_per_tok=1, tie_word_embeddings=True, num_key_value_heads=4),
        dict(n_active_experts=1, router_norm_topk=False, tie_embeddings=True)),
    "qwen2moe-zero-gate-shared-every2": (
        lambda: qwen2_moe(num_hidden_layers=4, decoder_sparse_step=2),
        dict(n_shared_experts=2, bias=True, moe_first_dense=1, moe_every=2, router_norm_topk=False)),
}


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def our_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


def random_hf(case: str):
    torch.manual_seed(0)
    return zero_shared_gates(randomize(IMPORTS[case][0](), seed=1))


@pytest.mark.parametrize("case", IMPORTS)
def test_imported_logits_equal_hf(case, tmp_path):
    hf = random_hf(case)
    model, _, cfg = load_model_for_inference(import_hf(hf_folder(tmp_path, hf), tmp_path / "ours"))
    assert (cfg.model.arch, cfg.model.router, cfg.model.dropless, cfg.model.vocab_size) == ("moe", "softmax", True,
                                                                                           VOCAB)
    for field, value in IMPORTS[case][1].items():
        assert getattr(cfg.model, field) == value, field
    x = ids()
    assert_logits_close(our_logits(model, x), hf_logits(hf, x))


def test_fused_expert_layout_imports_too(tmp_path):
    """transformers 5's in-memory tensors (gate_up_proj (E, 2H, C), down_proj (E, C, H)) saved as they are."""
    hf = random_hf("qwen3moe-top2-e8-renorm-first-dense")
    src = hf_folder(tmp_path, hf)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(src / "model.safetensors"))
    assert "model.layers.1.mlp.experts.gate_up_proj" in load_file(str(src / "model.safetensors"))
    model, _, _ = load_model_for_inference(import_hf(src, tmp_path / "ours"))
    x = ids()
    assert_logits_close(our_logits(model, x), hf_logits(hf, x))


# name -> (our ModelConfig fields, the HF class the export must pick)
EXPORTS = {
    "mixtral-top2-gqa": (dict(bias=False, n_kv_head=2, tie_embeddings=False), "MixtralForCausalLM"),
    "mixtral-top1-e8-window5": (dict(bias=False, n_experts=8, n_active_experts=1, sliding_window=5),
                                "MixtralForCausalLM"),
    "qwen3moe-qknorm-bias-first-dense-raw": (dict(bias=True, qk_norm=True, n_layer=3, moe_first_dense=1,
                                                  router_norm_topk=False), "Qwen3MoeForCausalLM"),
    "qwen2moe-shared-every2": (dict(bias=False, n_shared_experts=2, n_layer=3, moe_every=2), "Qwen2MoeForCausalLM"),
    "qwen2moe-defaults-biases-no-shared": (dict(), "Qwen2MoeForCausalLM"),  # ModelConfig's bias=True
}
MOE = dict(arch="moe", n_experts=4, n_active_experts=2, expert_hidden=24, ffn_hidden=40)


@pytest.mark.parametrize("case", EXPORTS)
def test_exported_model_loads_in_transformers_with_equal_logits(case, tmp_path):
    fields, hf_class = EXPORTS[case]
    run, model, _ = our_checkpoint(tmp_path, seed=1, **{**MOE, **fields})
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == hf_class
    x = ids(vocab=model.config.vocab_size)
    ours = our_logits(model.eval(), x)
    assert_logits_close(hf_logits(hf, x), ours)

    back, _, cfg = load_model_for_inference(import_hf(out, tmp_path / "back"))
    for field in ("n_experts", "n_active_experts", "n_shared_experts", "router_norm_topk", "moe_every",
                  "moe_first_dense", "qk_norm", "bias", "sliding_window"):
        assert getattr(cfg.model, field) == getattr(model.config, field), field
    torch.testing.assert_close(our_logits(back, x), ours, atol=1e-6, rtol=0)


def test_hf_generate_on_the_export_matches_our_greedy_choice(tmp_path):
    run, model, _ = our_checkpoint(tmp_path, seed=2, **{**MOE, "bias": False})
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf")).eval()
    seq = ids(5, vocab=model.config.vocab_size)[:1, :4]
    want = hf.generate(seq, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    for _ in range(8):
        seq = torch.cat([seq, our_logits(model.eval(), seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert seq.tolist() == want.tolist()


# -- refusals ----------------------------------------------------------------------------------
def refused(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_gated_shared_expert_is_refused_by_tensor(tmp_path):
    torch.manual_seed(0)
    hf = randomize(qwen2_moe(), seed=1)  # a non-zero shared_expert_gate, as in every trained Qwen2-MoE
    msg = refused(import_hf, hf_folder(tmp_path, hf), tmp_path / "out")
    assert "model.layers.0.mlp.shared_expert_gate.weight is not zero" in msg and "MoELayer.shared" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields,words", [
    (dict(mlp_only_layers=[1]), "mlp_only_layers=[1]"),  # MoE layers 0, 2, 3: not evenly spaced
    (dict(decoder_sparse_step=5), "decoder_sparse_step=5"),  # no MoE layer at all
    (dict(shared_expert_intermediate_size=30), "shared_expert_intermediate_size=30"),
    (dict(num_experts_per_tok=6), "num_experts_per_tok=6"),
])
def test_inexpressible_config_names_the_field(fields, words, tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["Qwen2MoeForCausalLM"], **SIZES,
                                                 "num_hidden_layers": 4, "intermediate_size": 40,
                                                 "moe_intermediate_size": 24, "num_experts": 4, **fields}))
    msg = refused(import_hf, src, tmp_path / "out")
    assert words in msg and "config.json" in msg


def test_partial_experts_are_named(tmp_path):
    torch.manual_seed(0)
    src = hf_folder(tmp_path, randomize(mixtral(), seed=1))
    sd = load_file(str(src / "model.safetensors"))
    del sd["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(sd, str(src / "model.safetensors"))
    msg = refused(import_hf, src, tmp_path / "out")
    assert "missing tensors model.layers.1.mlp.experts.2.w3.weight" in msg


def test_dense_weights_under_an_moe_config_name_the_missing_tensors(tmp_path):
    """A Llama's files with a Mixtral config.json: the converter names the router and experts it lacks."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES, intermediate_size=24))
    src = hf_folder(tmp_path, hf)
    fields = json.loads((src / "config.json").read_text())
    fields.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=4)
    (src / "config.json").write_text(json.dumps(fields))
    msg = refused(import_hf, src, tmp_path / "out")
    assert "missing tensors model.layers.0.mlp.experts.gate_up_proj, model.layers.0.mlp.experts.down_proj" in msg


@pytest.mark.parametrize("saved,loaded", [("llama", "moe"), ("moe", "llama")])
def test_checkpoint_of_the_other_kind_names_the_missing_tensors(saved, loaded, tmp_path):
    own = MOE if saved == "moe" else {"ffn_hidden": MOE["ffn_hidden"]}  # a Llama has no expert settings
    run, _, _ = our_checkpoint(tmp_path, **{**own, "arch": saved, "bias": False})
    ckpt = find_checkpoint(run)
    cfg = load_config(ckpt / "config.json")
    cfg.model = switch_arch(cfg.model, loaded)  # the config of the other kind, the weights unchanged
    cfg.save(ckpt / "config.json")
    msg = refused(load_model_for_inference, run)
    want = "layers.0.feed_forward.gate.weight" if loaded == "moe" else "layers.0.feed_forward.w1.weight"
    assert "missing tensors" in msg and want in msg


@pytest.mark.parametrize("fields,words", [
    (dict(router="sigmoid"), "model.router='sigmoid'"),
    (dict(qk_norm=True, n_shared_experts=1), "model.n_shared_experts=1 with model.qk_norm=true"),
])
def test_export_refusals(fields, words, tmp_path):
    run, _, _ = our_checkpoint(tmp_path, **{**MOE, **fields})
    assert words in refused(export_hf, run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
