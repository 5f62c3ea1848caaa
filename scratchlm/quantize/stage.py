"""`scratchlm quantize`: a checkpoint in, a quantized checkpoint out, with bytes and bits per byte
before and after.

Methods: int8, fp8 (per output row), int4, nf4 (per group of inputs): round-to-nearest, no data
needed; gptq and awq: int4 fitted on calibration text (scratchlm/quantize/calibrate.py), with
GPTQ's error feedback (gptq.py) or AWQ's searched input scales (awq.py); bf16: the whole model's
weights (embeddings and norms too) stored and run in bfloat16, a 2-byte format that needs no dequantizing
(on CPUs with bf16 units the fastest to decode: `bench/quant.py`). Every nn.Linear is
quantized except the output head and the router (`scratchlm.model.quant.DEFAULT_SKIP`) and a head
tied to the embedding; embeddings and norms stay full precision.

The output is a checkpoint folder like any other plus `quant.json` (the format record from which
`load_model_for_inference` rebuilds the quantized layers): `scratchlm sample`, `chat` and `eval`
load it. Refused, each in one line: an already quantized checkpoint (a `quant.json`, or a QLoRA
fine-tune whose base is quantized), a group size that does not divide a layer's width, gptq/awq
without calibration text, calibration text shorter than one block. A LoRA fine-tune is merged
first (its adapters added into full-precision weights), then quantized.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlm.checkpoint.folder import (
    find_checkpoint,
    load_config_and_tokenizer,
    load_policy,
    read_quant_record,
    save_weights_checkpoint,
)
from scratchlm.errors import UserError
from scratchlm.eval.perplexity import overall, score_documents
from scratchlm.eval.suite import heldout_texts
from scratchlm.model.quant import GROUPED, QuantLinear, quant_record, quantizable_linears, quantize_model
from scratchlm.quantize.awq import awq
from scratchlm.quantize.calibrate import (
    LayerInputs,
    calibration_blocks,
    calibration_texts,
    quantize_sequentially,
)
from scratchlm.quantize.gptq import check_width, gptq

METHODS = ("int8", "int4", "nf4", "fp8", "gptq", "awq", "bf16")
METHOD_FORMAT = {"int8": "int8", "int4": "int4", "nf4": "nf4", "fp8": "fp8", "gptq": "int4", "awq": "int4",
                 "bf16": "bf16"}
CALIBRATED = ("gptq", "awq")


@dataclass
class QuantizeResult:
    out: Path
    bytes_before: int
    bytes_after: int
    bpb_before: float | None
    bpb_after: float | None
    layers: int
    seconds: float


def heldout_bpb(model: nn.Module, tok, texts: list[str]) -> float:
    return overall(score_documents(model, tok, [(f"val:{i}", t) for i, t in enumerate(texts)]))["bits_per_byte"]


def check_quantizable(ckpt: Path) -> None:
    """Refuse a checkpoint that is quantized already."""
    record = read_quant_record(ckpt)
    if record is not None:
        raise UserError(f"{ckpt}: already quantized ({record.get('method', '?')}); quantizing it again would "
                        "round rounded weights", fix="quantize the full-precision checkpoint it was made from")
    cfg, _ = load_config_and_tokenizer(ckpt)
    if cfg.sft.quant_bits:
        raise UserError(f"{ckpt}: a QLoRA fine-tune, whose base is already quantized (sft.quant_bits="
                        f"{cfg.sft.quant_bits})", fix="merge it first (`scratchlm merge`), then quantize the merged "
                                                     "checkpoint")


def quantize_checkpoint(src: str | Path, out: str | Path, method: str, *, group_size: int = 64,
                        calib: str | Path | None = None, data: str | Path | None = None, calib_blocks: int = 32,
                        calib_len: int | None = None, act_order: bool = False, percdamp: float = 0.01,
                        measure: bool = True, log: Callable[[str], None] = print) -> QuantizeResult:
    """Quantize the checkpoint at `src` with `method` and write the result to `out` (see the module
    docstring). `data`: a prepared data folder whose validation split measures bits per byte before
    and after (default: `calib` when it is one); `measure=False` skips that measurement."""
    t0 = time.perf_counter()
    if method not in METHODS:
        raise UserError(f"--method {method} is unknown", fix=f"use one of {', '.join(METHODS)}")
    fmt = METHOD_FORMAT[method]
    ckpt = find_checkpoint(src)
    check_quantizable(ckpt)
    if method in CALIBRATED and calib is None:
        raise UserError(f"--method {method} fits the weights to calibration text, and none is given",
                        fix="pass --calib DATA_DIR (a prepared data folder) or a text file")
    model, tok, cfg = load_policy(ckpt)
    model.requires_grad_(False).eval()
    names = quantizable_linears(model)
    if not names:
        raise UserError(f"{ckpt}: the model has no linear layer to quantize", fix="quantize a transformer checkpoint")
    if fmt in GROUPED:
        for name in names:
            check_width(model.get_submodule(name).in_features, fmt, group_size, name)
    blocks = None
    if method in CALIBRATED:  # read and refuse the calibration text before any slow work
        block_len = calib_len or min(model.config.block_size, 512)
        blocks = calibration_blocks(tok, calibration_texts(calib), block_len, calib_blocks, source=f"--calib {calib}")
    if data is None and calib is not None and (Path(calib) / "manifest.json").is_file():
        data = calib
    val = heldout_texts(data)[0] if data is not None and measure else None
    bpb_before = heldout_bpb(model, tok, val) if val else None
    if bpb_before is not None:
        log(f"held-out bits per byte before: {bpb_before:.4f} ({len(val)} documents of {data})")

    if method in CALIBRATED:
        log(f"{method}: {len(names)} layers, {blocks.size(0)} calibration blocks of {blocks.size(1)} tokens")

        def one_layer(name: str, linear: nn.Linear, inputs: LayerInputs) -> QuantLinear:
            if method == "gptq":
                q = gptq(linear.weight, inputs.hessian, fmt, group_size, percdamp=percdamp, act_order=act_order)
                layer = QuantLinear.from_linear(linear, group_size=group_size, fmt=fmt)
            else:
                q, s, _ = awq(linear.weight, inputs.x, fmt, group_size)
                layer = QuantLinear.from_linear(linear, group_size=group_size, fmt=fmt, in_scale=s)
            layer.set_codes(q.qweight, q.scales)
            return layer

        quantize_sequentially(model, names, blocks, one_layer, keep_rows=method == "awq", log=log)
    elif method == "bf16":
        model.to(torch.bfloat16)
    else:
        quantize_model(model, group_size=group_size, fmt=fmt)
    bpb_after = heldout_bpb(model, tok, val) if val else None

    skipped = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    record: dict[str, Any] = {"method": method, "format": fmt, "group_size": group_size if fmt in GROUPED else 0,
                              "skipped": skipped, "source": str(ckpt), "layers": quant_record(model)}
    if method == "bf16":
        record["dtype"] = "bfloat16"  # every tensor; the loader casts the model before loading
    if method in CALIBRATED:
        record["calibration"] = {"source": str(calib), "blocks": blocks.size(0), "block_len": blocks.size(1),
                                 **({"percdamp": percdamp, "act_order": act_order} if method == "gptq" else {})}
    cfg.out_dir = str(out)
    save_weights_checkpoint(Path(out), model, cfg, tok, {"quantized_from": str(ckpt)}, quant=record)
    before, after = (Path(p) / "model.safetensors" for p in (ckpt, out))
    result = QuantizeResult(Path(out), before.stat().st_size, after.stat().st_size, bpb_before, bpb_after,
                            len(names), time.perf_counter() - t0)
    log(f"{method}: {len(names)} layers -> {out}; model.safetensors {result.bytes_before / 1e6:.2f} MB -> "
        f"{result.bytes_after / 1e6:.2f} MB ({result.bytes_after / result.bytes_before:.1%})")
    if bpb_after is not None:
        log(f"held-out bits per byte: {bpb_before:.4f} -> {bpb_after:.4f} "
            f"({(bpb_after - bpb_before) / bpb_before:+.2%})")
    return result
