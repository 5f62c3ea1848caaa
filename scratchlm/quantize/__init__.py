"""Post-training quantization, a stage (`scratchlm quantize`): a trained checkpoint -> a quantized one.

- `gptq.py`: GPTQ as pure functions of a weight and its calibration Hessian; round-to-nearest in the
  same terms; the output error every method is judged by.
- `awq.py`: AWQ-style activation-aware input scales, searched on calibration inputs.
- `calibrate.py`: calibration text -> token blocks -> each linear's inputs, block by block.
- `stage.py`: the verb's work: load, refuse bad input, quantize, save with the format record,
  measure bytes and held-out bits per byte before and after.

The formats themselves (int8, int4, nf4, fp8 storage and the QuantLinear layer) are a model part,
scratchlm/model/quant.py.
"""
