"""Cache size pictures: the bytes measured from each model's real cache equal the layout's formula (GQA, MLA,
Jamba's attention layers plus a constant state), the PNG from the CLI, and what is refused."""

from __future__ import annotations

from scratchlm.cli import main
from scratchlm.viz.cache import describe, measure_cache
from tests.helpers import make_checkpoint, tiny_model

F32 = 4  # bytes per element: the test models are fp32
GQA = dict(arch="llama", n_layer=3, n_head=4, n_kv_head=2, n_embd=32)
MLA = dict(arch="mla", bias=False, n_layer=3, n_head=4, n_embd=32, n_experts=4, n_active_experts=2,
           expert_hidden=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, moe_first_dense=1)
JAMBA = dict(arch="jamba", bias=False, n_layer=4, n_head=4, n_kv_head=2, n_embd=32, n_experts=4, mamba_d_state=4,
             mamba_expand=2)


def test_gqa_bytes_are_two_x_layers_x_kv_heads_x_head_dim():
    curve = measure_cache(tiny_model(**GQA), "gqa", max_blocks=3)
    per_token = 2 * 3 * 2 * (32 // 4) * F32  # K and V x layers x kv heads x head dim x bytes
    assert curve.per_token == per_token == 384 and curve.state == 0
    assert curve.contexts == [1, 16, 32, 48]  # 1 token, then 1..3 x block_size
    assert curve.total == [n * per_token for n in curve.contexts]
    assert describe(curve).startswith("gqa: 384 B/token = 2 x 3 layers x 2 kv heads x 8 dims x 4 B;")


def test_mla_bytes_are_layers_x_latent_plus_rope_key():
    curve = measure_cache(tiny_model(**MLA), "mla", max_blocks=3)
    per_token = 3 * (12 + 4) * F32  # layers x (latent + RoPE key) x bytes: no factor 2, no heads
    assert curve.per_token == per_token == 192 and curve.state == 0
    assert curve.total == [n * per_token for n in curve.contexts]
    assert describe(curve).startswith("mla: 192 B/token = 3 layers x (12 latent + 4 RoPE key) x 4 B;")


def test_jamba_grows_by_its_attention_layers_only_and_its_state_is_constant():
    model = tiny_model(**JAMBA)
    curve = measure_cache(model, "jamba", max_blocks=10)
    per_token = 2 * len(model.attention_slot) * 2 * 8 * F32  # the one attention layer in four
    assert len(model.attention_slot) == 1 and curve.per_token == per_token == 128
    assert curve.contexts[-1] == 160 and curve.state > 0
    assert curve.total == [n * per_token + curve.state for n in curve.contexts]  # the same state at 1 and 160
    assert f"+ {curve.state:,} B of recurrent state" in describe(curve)


def test_a_gpt_curve_ends_at_block_size():
    curve = measure_cache(tiny_model(), "gpt", max_blocks=4)  # learned positions: none past block_size
    assert curve.contexts == [1, 16]
    assert curve.per_token == 2 * 2 * 2 * 16 * F32


def test_cli_draws_checkpoints_and_refuses_bad_input(tmp_path, capsys):
    runs = [make_checkpoint(tmp_path / name, **kw) for name, kw in (("gqa", GQA), ("mla", MLA))]
    png = tmp_path / "out" / "cache.png"
    args = ["viz", "cache", "--ckpt", str(runs[0]), "--ckpt", str(runs[1]), "--max-blocks", "2", "--out", str(png)]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("gqa (llama): 384 B/token") and lines[1].startswith("mla (mla): 192 B/token")
    assert lines[2] == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    bigram = make_checkpoint(tmp_path / "bigram", arch="bigram")
    assert main(["viz", "cache", "--ckpt", str(bigram), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bigram model keeps no inference cache" in err[0]
    assert main(["viz", "cache", "--ckpt", str(runs[0]), "--max-blocks", "0", "--out", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-blocks 0 must be >= 1" in err[0]
