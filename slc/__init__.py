"""slc: explore how far the weights of a language model compress, and what it costs."""
from .errors import FormatError
from .quant import QuantizedTensor, Quantizer

__all__ = ["FormatError", "Quantizer", "QuantizedTensor"]
__version__ = "0.1.0"
from .tensor import CompressedTensor

__all__ += ["CompressedTensor"]
