"""scratchlm -> GGUF (Llama and GPT-2): the file reads back with llama.cpp's own Python reader (every key and tensor
shape), our Q8_0 blocks are byte for byte `gguf.quants.quantize`'s, and an independent loader,
transformers' GGUF reader, computes our logits from the file; a round trip through our own code
could not catch a wrong Q/K permutation, which that comparison does (and is shown to)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize, quantize

import scratchlm.convert.gguf_export as gguf_export
from scratchlm.cli import main
from scratchlm.config import RopeConfig
from scratchlm.convert import convert, export_gguf
from scratchlm.convert.chat_template import CHAT_TEMPLATE
from scratchlm.errors import UserError
from scratchlm.model.llama import ffn_hidden
from scratchlm.tokenizer import ByteTokenizer, CharTokenizer
from tests.convert.common import chat_bpe, checkpoint_with
from tests.helpers import assert_logits_close, ids, our_checkpoint, tiny_bpe

transformers = pytest.importorskip("transformers")

Q8 = GGMLQuantizationType.Q8_0
# 4 heads of dim 8 (pairs rotated at 4 different speeds) sharing 2 kv heads: a wrong Q/K layout
# changes every logit past position 0 by O(1) (measured: 5.4 at std 0.2).
LLAMA = dict(arch="llama", bias=False, n_kv_head=2)


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def logits(model, x: torch.Tensor, hf: bool) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits if hf else model(x)[0]


def hf_from_gguf(path, **config):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **config).eval()


# -- the file, read back -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_reader_sees_every_key_and_tensor(dtype, tied, tmp_path):
    run, model, tok = checkpoint_with(tmp_path, chat_bpe(), **LLAMA, tie_embeddings=tied)
    m = model.config
    r = GGUFReader(export_gguf(run, tmp_path / "m.gguf", dtype=dtype))
    V, C, D, F = m.vocab_size, m.n_embd, m.n_embd // m.n_head, ffn_hidden(m)
    sp = tok.special_tokens
    want = {
        "general.architecture": "llama", "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7}[dtype],
        "llama.vocab_size": V, "llama.context_length": m.block_size, "llama.embedding_length": C,
        "llama.block_count": m.n_layer, "llama.feed_forward_length": F, "llama.attention.head_count": m.n_head,
        "llama.attention.head_count_kv": 2, "llama.rope.freq_base": m.rope.theta, "llama.rope.dimension_count": D,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.bos_token_id": tok.eot_id, "tokenizer.ggml.eos_token_id": sp["<|end|>"],
        "tokenizer.ggml.eot_token_id": sp["<|end|>"], "tokenizer.ggml.padding_token_id": sp["<|pad|>"],
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, value in want.items():
        assert field(r, key) == value, key
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(m.norm_eps, rel=1e-6)

    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == V > tok.vocab_size  # one token per embedding row, padding included
    assert tokens[ord("!")] == "!" and tokens[ord(" ")] == "Ġ" and tokens[sp["<|user|>"]] == "<|user|>"  # GPT-2's
    assert tok.vocab[256] == b" b" and tokens[256] == "Ġb"  # alphabet, as in tokenizer.json
    assert types[sp["<|end|>"]] == TokenType.CONTROL and types[100] == TokenType.NORMAL
    assert tokens[V - 1] == f"[PAD{V - 1}]" and types[V - 1] == TokenType.UNUSED
    merges = field(r, "tokenizer.ggml.merges")
    assert len(merges) == len(tok.merges) and all(len(mg.split(" ")) == 2 for mg in merges)

    # GGUF lists dims innermost first: a torch (out, in) matrix is [in, out]
    shapes = {t.name: [int(n) for n in t.shape] for t in r.tensors}
    types_of = {t.name: t.tensor_type for t in r.tensors}
    want_shapes = {"token_embd.weight": [C, V], "output_norm.weight": [C]}
    if not tied:
        want_shapes["output.weight"] = [C, V]
    for i in range(m.n_layer):
        want_shapes.update({
            f"blk.{i}.attn_norm.weight": [C], f"blk.{i}.attn_q.weight": [C, C], f"blk.{i}.attn_k.weight": [C, 2 * D],
            f"blk.{i}.attn_v.weight": [C, 2 * D], f"blk.{i}.attn_output.weight": [C, C],
            f"blk.{i}.ffn_norm.weight": [C], f"blk.{i}.ffn_gate.weight": [C, F], f"blk.{i}.ffn_up.weight": [C, F],
            f"blk.{i}.ffn_down.weight": [F, C],
        })
    assert shapes == want_shapes
    matrix = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16, "q8_0": Q8}[dtype]
    for name, kind in types_of.items():
        assert kind == (GGMLQuantizationType.F32 if len(shapes[name]) == 1 else matrix), name


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_gpt2_file_keys_and_tensors(dtype, tmp_path):
    run, model, tok = checkpoint_with(tmp_path, tiny_bpe(), arch="gpt", tie_embeddings=False)
    m = model.config
    r = GGUFReader(export_gguf(run, tmp_path / "m.gguf", dtype=dtype))
    V, C, T = m.vocab_size, m.n_embd, m.block_size
    want = {"general.architecture": "gpt2", "gpt2.context_length": T, "gpt2.embedding_length": C,
            "gpt2.block_count": m.n_layer, "gpt2.feed_forward_length": 4 * C, "gpt2.attention.head_count": m.n_head,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.eos_token_id": tok.eot_id}
    for key, value in want.items():
        assert field(r, key) == value, key
    assert field(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5, rel=1e-6)
    shapes = {t.name: [int(n) for n in t.shape] for t in r.tensors}
    want_shapes = {"token_embd.weight": [C, V], "position_embd.weight": [C, T], "output.weight": [C, V],
                   "output_norm.weight": [C], "output_norm.bias": [C]}
    for i in range(m.n_layer):
        for name, shape in {"attn_norm": [C], "attn_qkv": [C, 3 * C], "attn_output": [C, C], "ffn_norm": [C],
                            "ffn_up": [C, 4 * C], "ffn_down": [4 * C, C]}.items():
            want_shapes[f"blk.{i}.{name}.weight"] = shape
            want_shapes[f"blk.{i}.{name}.bias"] = [shape[-1]]
    assert shapes == want_shapes
    kinds = {t.name: t.tensor_type for t in r.tensors}
    assert kinds["position_embd.weight"] == GGMLQuantizationType.F32  # learned positions stay F32
    assert kinds["blk.0.attn_qkv.weight"] == (Q8 if dtype == "q8_0" else GGMLQuantizationType.F32)


def test_a_base_model_stops_at_endoftext_and_has_no_template(tmp_path):
    run, _, tok = our_checkpoint(tmp_path, **LLAMA)
    r = GGUFReader(export_gguf(run, tmp_path / "m.gguf"))
    assert field(r, "tokenizer.ggml.eos_token_id") == tok.eot_id
    assert "tokenizer.chat_template" not in r.fields and "tokenizer.ggml.eot_token_id" not in r.fields


# -- Q8_0 ----------------------------------------------------------------------------------------
def test_q8_0_blocks_are_byte_identical_to_gguf():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 96, generator=g) * torch.logspace(-6, 3, 24).unsqueeze(1)  # rows of every magnitude
    w[3, :32] = 0  # an all-zero block: scale 0
    # a block whose scale is exactly 1 (max 127), holding exact halves: round half away from zero
    w[4, :32] = torch.tensor([127.0, 2.5, -2.5, 0.5, -0.5, 3.5, -126.5, 1.49999988] + [0.25] * 24)
    ours = gguf_export.quantize_q8_0(w)
    theirs = quantize(w.numpy(), Q8)
    assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == theirs.shape == (24, 3 * 34)
    assert ours.tobytes() == theirs.tobytes()
    q = ours[4, 2:34].view(np.int8)
    assert q[:8].tolist() == [127, 3, -3, 1, -1, 4, -127, 1]  # torch.round would give 2, -2, 0, -0, 4, -126


def test_q8_0_tensors_in_the_file_are_gguf_quantized_permuted_weights(tmp_path):
    run, model, _ = checkpoint_with(tmp_path, tiny_bpe(), **LLAMA)
    r = GGUFReader(export_gguf(run, tmp_path / "m.gguf", dtype="q8_0"))
    data = {t.name: np.asarray(t.data) for t in r.tensors}
    wq = model.layers[1].attention.wq.weight.detach()
    assert data["blk.1.attn_q.weight"].tobytes() == \
        quantize(gguf_export.permute_rope_rows(wq, 4).numpy(), Q8).tobytes()
    wd = model.layers[0].feed_forward.w2.weight.detach()
    assert data["blk.0.ffn_down.weight"].tobytes() == quantize(wd.numpy(), Q8).tobytes()


# -- an independent loader computes our logits ----------------------------------------------------
CASES = {
    "gqa-tied": (LLAMA, False),
    "mha-untied-chat": (dict(arch="llama", bias=False, tie_embeddings=False), True),
    "multi-query-ntk": (dict(arch="llama", bias=False, n_kv_head=1, rope=RopeConfig(scaling="ntk", factor=4.0)),
                        False),
    "gpt2-tied": (dict(arch="gpt"), False),
    "gpt2-untied-chat": (dict(arch="gpt", tie_embeddings=False), True),
}


@pytest.mark.parametrize("case", CASES)
def test_transformers_gguf_loader_gives_our_logits(case, tmp_path):
    fields, chat = CASES[case]
    run, model, _ = checkpoint_with(tmp_path, chat_bpe() if chat else tiny_bpe(), seed=3, **fields)
    path = export_gguf(run, tmp_path / "m.gguf", dtype="f32")
    gpt = fields["arch"] == "gpt"
    # transformers reads gpt2.context_length into n_ctx, not n_positions (the size of its position
    # table): say it here; llama.cpp sizes position_embd from context_length itself
    hf = hf_from_gguf(path, **({"n_positions": model.config.block_size} if gpt else {}))
    assert type(hf).__name__ == ("GPT2LMHeadModel" if gpt else "LlamaForCausalLM")
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    x = ids(vocab=model.config.vocab_size)
    assert_logits_close(logits(hf, x, hf=True), logits(model.eval(), x, hf=False))


def test_without_the_qk_permutation_the_logits_differ(tmp_path, monkeypatch):
    """The check above is strong enough to catch a wrong RoPE layout: export without the permutation."""
    run, model, _ = checkpoint_with(tmp_path, tiny_bpe(), **LLAMA)
    monkeypatch.setattr(gguf_export, "permute_rope_rows", lambda w, n_head: w)
    hf = hf_from_gguf(export_gguf(run, tmp_path / "m.gguf"))
    x = ids(vocab=model.config.vocab_size)
    diff = (logits(hf, x, hf=True) - logits(model.eval(), x, hf=False)).abs()
    assert diff[:, 0].max() < 1e-4  # position 0 is not rotated: the rest of the model is right
    assert diff[:, 1:].max() > 0.1


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_quantized_exports_compute_our_model_with_rounded_weights(dtype, tmp_path):
    """F16 / Q8_0 files hold our weights rounded by gguf's own quantizer, in the right layout: the
    loader's logits equal those of our model with its matrices rounded the same way."""
    run, model, _ = checkpoint_with(tmp_path, tiny_bpe(), **LLAMA, tie_embeddings=False)
    hf = hf_from_gguf(export_gguf(run, tmp_path / "m.gguf", dtype=dtype))
    kind = Q8 if dtype == "q8_0" else GGMLQuantizationType.F16
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(dequantize(quantize(p.numpy(), kind), kind)).reshape(p.shape))
    x = ids(vocab=model.config.vocab_size)
    assert_logits_close(logits(hf, x, hf=True), logits(model.eval(), x, hf=False))


# -- the command line and bad input -------------------------------------------------------------
def cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out + err


def test_cli_writes_one_file_and_refuses_to_overwrite_it(capsys, tmp_path):
    run, _, _ = checkpoint_with(tmp_path, tiny_bpe(), **LLAMA)
    dst = tmp_path / "out" / "m.gguf"
    args = ["convert", str(run), str(dst), "--from", "scratchlm", "--to", "gguf", "--dtype", "q8_0"]
    code, out = cli(capsys, *args)
    assert code == 0 and f"wrote {dst}" in out and "Q8_0" in out
    assert GGUFReader(dst).fields["general.file_type"].contents() == 7
    assert sorted(p.name for p in dst.parent.iterdir()) == ["m.gguf"]  # no temporary left behind
    before = dst.read_bytes()
    code, out = cli(capsys, *args[:-1], "f16")
    assert code == 2 and "already exists" in out and "--overwrite" in out and len(out.strip().splitlines()) == 1
    assert dst.read_bytes() == before
    code, _ = cli(capsys, *args[:-1], "f16", "--overwrite")
    assert code == 0 and GGUFReader(dst).fields["general.file_type"].contents() == 1


@pytest.mark.parametrize("fields,words", [
    (dict(arch="moe", bias=False, n_experts=2, n_active_experts=1), "model.arch='moe' has no GGUF export"),
    (dict(arch="bigram"), "model.arch='bigram' has no GGUF export"),
    (dict(arch="gpt", bias=False), "model.bias=false"),
    (dict(arch="gpt", pos_emb="sinusoidal"), "model.pos_emb='sinusoidal'"),
    (dict(arch="llama", bias=True), "model.bias=true"),
    (dict(arch="llama", bias=False, sliding_window=4), "model.sliding_window=4"),
    (dict(arch="llama", bias=False, rope=RopeConfig(scaling="yarn", factor=2.0)), "model.rope.scaling=yarn"),
])
def test_unsupported_models_are_one_line_exit_2(fields, words, capsys, tmp_path):
    run, _, _ = checkpoint_with(tmp_path, tiny_bpe(), **fields)
    code, out = cli(capsys, "convert", str(run), str(tmp_path / "m.gguf"), "--from", "scratchlm", "--to", "gguf")
    assert code == 2 and words in out and len(out.strip().splitlines()) == 1
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("tok", [ByteTokenizer({"<|endoftext|>": 256}),
                                 CharTokenizer(sorted(set("abc ")), {"<|endoftext|>": 4})], ids=["byte", "char"])
def test_tokenizers_without_merges_are_refused(tok, tmp_path):
    run, _, _ = checkpoint_with(tmp_path, tok, **LLAMA)
    with pytest.raises(UserError, match=f"a {tok.kind} tokenizer has no GGUF form"):
        export_gguf(run, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_flag_mistakes(capsys, tmp_path):
    run, _, _ = checkpoint_with(tmp_path, tiny_bpe(), **LLAMA)
    code, out = cli(capsys, "convert", str(run), str(tmp_path / "m.gguf"), "--from", "scratchlm", "--to", "gguf",
                    "--dtype", "q4_k")
    assert code == 2 and "invalid choice: 'q4_k'" in out
    with pytest.raises(UserError, match="--dtype f16 applies to --to gguf only"):
        convert(run, tmp_path / "hf", src_format="scratchlm", dst_format="hf", dtype="f16")
    with pytest.raises(UserError, match="GGUF is written from scratchlm checkpoints only"):
        convert(tmp_path / "x", tmp_path / "m.gguf", src_format="hf", dst_format="gguf")
