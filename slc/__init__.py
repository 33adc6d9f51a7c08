"""slc: explore how far the weights of a language model compress, and what it costs.

    float weight --Quantizer--> QuantizedTensor --(predictor)--> symbols --rANS--> CompressedTensor
    nn.Linear --CompressedLinear.from_linear(spec)--> CompressedLinear (quantized | entropy | lowrank)
    model --compress_model(policy)--> compressed model --save_compressed--> file --load_compressed--> model
"""
from .errors import FormatError
from .quant import QuantizedTensor, Quantizer
from .tensor import CompressedTensor
from .nn import CompressedEmbedding, CompressedLinear, DecodeCache, LinearSpec, TiedLinear
from .lowrank import LowRank, allocate_ranks, low_rank
from .model import (CompressionReport, compress_model, compressed_layers, load_compressed, lowrank_policy,
                    save_compressed)
from .allocate import Allocation, allocate   # the function shadows the submodule name on purpose
from . import metrics, memory, models, rans

__all__ = [
    "FormatError", "Quantizer", "QuantizedTensor", "CompressedTensor",
    "CompressedLinear", "CompressedEmbedding", "DecodeCache", "LinearSpec", "TiedLinear",
    "LowRank", "allocate_ranks", "low_rank",
    "CompressionReport", "compress_model", "compressed_layers", "load_compressed", "lowrank_policy",
    "save_compressed", "allocate", "Allocation", "metrics", "memory", "models", "rans",
]
__version__ = "0.1.0"
