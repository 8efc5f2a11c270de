from fade_kernels.nn.quant_linear import QuantLinear, replace_linears

__all__ = ["QuantLinear", "replace_linears"]
