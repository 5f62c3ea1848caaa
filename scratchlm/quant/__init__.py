"""The quantization stage: weight-only int8 and int4 (group-wise) quantization of linear layers."""
