"""`scratchlm quantize` end to end: a checkpoint that sample and eval load, smaller on disk, with the
same logits as the model quantized in memory; bad input refused in one line (exit 2)."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.checkpoint import find_checkpoint, load_model_for_inference, load_weights
from scratchlm.cli import main
from scratchlm.config import load_config
from scratchlm.errors import UserError
from scratchlm.eval.suite import heldout_texts
from scratchlm.model import build_model
from scratchlm.model.quant import QuantLinear, quantize_model, weight_bytes
from scratchlm.quantize.stage import heldout_bpb, quantize_checkpoint


def _one_line_error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4", "nf4"])
def test_round_to_nearest_checkpoint_loads_with_identical_logits_and_shrinks(trained, tmp_path, fmt):
    _, base, _ = trained
    out = tmp_path / fmt
    assert main(["quantize", "--ckpt", str(base), "--method", fmt, "--group-size", "32", "--out", str(out),
                 "--quiet"]) == 0
    record = json.loads((out / "quant.json").read_text())
    assert record["method"] == fmt and record["format"] == fmt and len(record["layers"]) == 14
    assert record["skipped"] == ["output"]
    loaded, _, _ = load_model_for_inference(out)
    ref, _, _ = load_model_for_inference(base)
    quantize_model(ref, fmt=fmt, group_size=32)
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], ref(idx)[0])
    # on disk: the quantized layers shrink to their codes and scales, the rest is as it was
    wb = weight_bytes(ref)
    file_before = (find_checkpoint(base) / "model.safetensors").stat().st_size
    file_after = (out / "model.safetensors").stat().st_size
    expected = file_before - wb.quantized_fp32 + wb.quantized
    assert abs(file_after - expected) < 4096  # the safetensors header differs (names, dtypes) by a few KB
    assert file_after < 0.6 * file_before  # embeddings and the output head stay fp32 in this tiny model


def test_sample_and_eval_load_a_gptq_checkpoint_and_bits_per_byte_are_reported(trained, tmp_path, capsys):
    root, base, data = trained
    out = tmp_path / "gptq"
    assert main(["quantize", "--ckpt", str(base), "--method", "gptq", "--group-size", "32", "--calib", str(data),
                 "--calib-blocks", "8", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "held-out bits per byte:" in printed and "MB ->" in printed
    assert json.loads((out / "quant.json").read_text())["calibration"]["blocks"] == 8
    assert main(["sample", "--ckpt", str(out), "--prompt", "the", "--sample.max_new_tokens=5",
                 "--sample.temperature=0"]) == 0
    assert main(["eval", str(out), "--data", str(data), "--out", str(tmp_path / "ev"), "--quiet",
                 "--cloze-items", "5"]) == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["rows"][0]["task"] == "heldout"


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_checkpoint_scores_what_the_stage_measured(trained, tmp_path, method):
    _, base, data = trained
    res = quantize_checkpoint(base, tmp_path / method, method, group_size=32, calib=data, calib_blocks=8,
                              log=lambda s: None)
    model, tok, _ = load_model_for_inference(tmp_path / method)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == res.layers == 14
    assert heldout_bpb(model, tok, heldout_texts(data)[0]) == pytest.approx(res.bpb_after, rel=1e-9)
    assert res.bytes_after < 0.6 * res.bytes_before
    assert res.bpb_after < res.bpb_before * 1.05  # int4 on a tiny model: within a few percent


def test_measure_false_skips_bits_per_byte_and_writes_the_same_weights(trained, tmp_path):
    _, base, data = trained
    kw = dict(group_size=32, calib=data, calib_blocks=8, log=lambda s: None)
    measured = quantize_checkpoint(base, tmp_path / "a", "gptq", **kw)
    skipped = quantize_checkpoint(base, tmp_path / "b", "gptq", measure=False, **kw)
    assert measured.bpb_before is not None and skipped.bpb_before is None and skipped.bpb_after is None
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_bad_input_is_one_line(trained, tmp_path, capsys):
    _, base, data = trained
    q = tmp_path / "q"
    assert main(["quantize", "--ckpt", str(base), "--method", "int8", "--out", str(q), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["quantize", "--ckpt", str(q), "--method", "int4", "--group-size", "32", "--out",
                 str(tmp_path / "qq")]) == 2
    _one_line_error(capsys, "already quantized (int8)")
    assert main(["quantize", "--ckpt", str(base), "--method", "int4", "--group-size", "48", "--out",
                 str(tmp_path / "a")]) == 2
    _one_line_error(capsys, "group size 48 does not divide the input width 64 of layers.0.attention.wq")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert main(["quantize", "--ckpt", str(base), "--method", "gptq", "--group-size", "32", "--calib", str(short),
                 "--out", str(tmp_path / "b")]) == 2
    _one_line_error(capsys, "10 tokens of calibration text, shorter than one block of 64")
    assert main(["quantize", "--ckpt", str(base), "--method", "awq", "--out", str(tmp_path / "c")]) == 2
    _one_line_error(capsys, "--method awq", "--calib")
    assert main(["quantize", "--ckpt", str(base), "--method", "int8", "--out", str(q)]) == 2
    _one_line_error(capsys, "already exists")
    # a quantized checkpoint is for inference: loading it to train (a plain model) says so
    cfg = load_config(q / "config.json")
    with pytest.raises(UserError, match="quantized checkpoint"):
        load_weights(build_model(cfg.model), q)


def test_bf16_checkpoint_is_half_the_bytes_loads_in_bf16_and_samples(trained, tmp_path, capsys):
    _, base, _ = trained
    out = tmp_path / "bf16"
    assert main(["quantize", "--ckpt", str(base), "--method", "bf16", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "quant.json").read_text())
    assert (record["method"], record["dtype"], record["layers"]) == ("bf16", "bfloat16", {})
    loaded, _, _ = load_model_for_inference(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ref, _, _ = load_model_for_inference(base)
    ref.to(torch.bfloat16)
    idx = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], ref(idx)[0])  # the same cast, saved and loaded exactly
    file_before = (find_checkpoint(base) / "model.safetensors").stat().st_size
    assert abs((out / "model.safetensors").stat().st_size - file_before / 2) < 4096
    assert main(["sample", "--ckpt", str(out), "--prompt", "the", "--sample.max_new_tokens=5",
                 "--sample.temperature=0"]) == 0
    capsys.readouterr()
    assert main(["quantize", "--ckpt", str(out), "--method", "int8", "--out", str(tmp_path / "again")]) == 2
    _one_line_error(capsys, "already quantized")
