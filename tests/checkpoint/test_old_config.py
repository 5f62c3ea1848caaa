"""A checkpoint whose config.json holds the flat model section written before the model families
(one ModelConfig with every arch's fields, rope_* among them) loads as the same model: rope_* become
the rope section, and the fields of other archs, which the old code ignored, are dropped."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.checkpoint import find_checkpoint, load_model_for_inference
from scratchlm.config import RopeConfig
from tests.helpers import make_checkpoint

# The flat ModelConfig's fields and defaults as the old code wrote them to config.json (its
# scratchlm/config.py before "Config (issue 11)"), literally: the migration must keep reading these.
OLD_MODEL = {
    "arch": "gpt", "vocab_size": 0, "pad_vocab_to": 64, "block_size": 64, "n_layer": 4, "n_head": 4, "n_embd": 128,
    "dropout": 0.0, "bias": True, "pos_emb": "learned", "attn_impl": "sdpa", "tie_embeddings": True,
    "mlp_context": 3, "mlp_hidden": 256, "n_kv_head": 0, "ffn_hidden": 0, "norm_eps": 1e-05, "rope_theta": 10000.0,
    "rope_scaling": "none", "rope_factor": 1.0, "rope_original_context": 0, "qk_norm": False, "sliding_window": 0,
    "n_experts": 8, "n_active_experts": 2, "n_shared_experts": 0, "expert_hidden": 0, "router": "softmax",
    "router_norm_topk": True, "dropless": True, "capacity_factor": 1.25, "moe_every": 1, "moe_first_dense": 0,
    "aux_loss_coef": None, "z_loss_coef": 0.001, "bias_update_rate": 0.001,
}

# name -> (the model's settings, values of other archs' fields the old file held and the old code ignored)
CASES = {
    "gpt": (dict(arch="gpt", pos_emb="sinusoidal", bias=False),
            dict(qk_norm=True, n_kv_head=1, rope_scaling="yarn", n_experts=2, mlp_context=5)),
    "llama": (dict(arch="llama", bias=False, n_kv_head=1, qk_norm=True,
                   rope=RopeConfig(theta=5e5, scaling="linear", factor=2.0)),
              dict(pos_emb="sinusoidal", n_experts=3, mlp_hidden=7)),
    "moe": (dict(arch="moe", bias=False, n_experts=4, n_active_experts=1,
                 rope=RopeConfig(scaling="yarn", factor=2.0, original_context=8)),
            dict(pos_emb="sinusoidal", mlp_context=1)),
    "bigram": (dict(arch="bigram"), dict(n_layer=9, dropout=0.5, qk_norm=True, rope_theta=1.0)),
    "mlp": (dict(arch="mlp", mlp_context=2, mlp_hidden=16), dict(n_layer=9, n_head=3, router="sigmoid")),
}


def flat(model: dict, foreign: dict) -> dict:
    """Today's model section (as to_dict writes it) in the old flat layout: only the old fields (fields
    added since, such as the MoE's group-limited routing, are left to their defaults, as an old file would)."""
    rope = {f"rope_{k}": v for k, v in model.pop("rope", {}).items()}
    return {**OLD_MODEL, **foreign, **{k: v for k, v in model.items() if k in OLD_MODEL}, **rope}


@pytest.mark.parametrize("case", CASES)
def test_a_flat_config_json_loads_the_same_model(case, tmp_path):
    settings, foreign = CASES[case]
    run = make_checkpoint(tmp_path / "run", **settings)
    model, _, cfg = load_model_for_inference(run)
    file = find_checkpoint(run) / "config.json"
    d = json.loads(file.read_text())
    d["model"] = flat(d["model"], foreign)
    assert len(d["model"]) == 36 and "rope" not in d["model"]
    file.write_text(json.dumps(d))
    old_model, _, old_cfg = load_model_for_inference(run)
    assert old_cfg == cfg
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(old_model(x)[0], model(x)[0])
