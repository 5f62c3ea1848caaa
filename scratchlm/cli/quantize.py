"""The quantization verb: `scratchlm quantize` (a checkpoint -> a quantized checkpoint).

    scratchlm quantize --ckpt RUN --method int8|int4|nf4|fp8|gptq|awq|bf16 [--group-size 64]
                       [--calib DATA_DIR_or_text] [--data DATA_DIR] --out RUN_Q [--overwrite]

Glue only, as `commands.py`: the output path's check, then the stage's plain function.
"""

from __future__ import annotations

import argparse

from scratchlm.rundir import check_output_path

METHODS_HELP = ("int8 / fp8 (per output row), int4 / nf4 (per group of inputs): round-to-nearest; gptq / awq: int4 "
                "fitted on --calib text; bf16: every weight in bfloat16 (2 bytes, no dequantizing)")


def cmd_quantize(args: argparse.Namespace, overrides: list[str]) -> None:
    from scratchlm.quantize.stage import quantize_checkpoint

    check_output_path(args.out, overwrite=args.overwrite, inputs=[args.ckpt], folder=True)
    quantize_checkpoint(args.ckpt, args.out, args.method, group_size=args.group_size, calib=args.calib,
                        data=args.data, calib_blocks=args.calib_blocks, act_order=args.act_order)


def add_parsers(verbs: argparse._SubParsersAction, with_common, writes) -> None:
    """The quantize verb on the `scratchlm` parser (`with_common`, `writes`: the parser's helpers)."""
    sp = writes(with_common(verbs.add_parser("quantize", help="post-training quantization of a checkpoint (int8, "
                                                              "int4, nf4, fp8, GPTQ, AWQ)")))
    sp.add_argument("--ckpt", required=True, help="the run or checkpoint folder to quantize")
    sp.add_argument("--method", required=True, choices=("int8", "int4", "nf4", "fp8", "gptq", "awq", "bf16"),
                    help=METHODS_HELP)
    sp.add_argument("--group-size", type=int, default=64, help="int4, nf4, gptq, awq: inputs per scale (default 64); "
                                                               "must divide every quantized layer's input width")
    sp.add_argument("--calib", help="gptq, awq: calibration text: a prepared data folder (its training split) or a "
                                    "text file / folder of .txt files")
    sp.add_argument("--calib-blocks", type=int, default=32,
                    help="calibration blocks of the model's context (default 32)")
    sp.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing Hessian diagonal")
    sp.add_argument("--data", help="a prepared data folder whose validation split measures held-out bits per byte "
                                   "before and after (default: --calib when it is one)")
    sp.add_argument("--out", required=True, help="the checkpoint folder to write")
    sp.set_defaults(fn=cmd_quantize)
