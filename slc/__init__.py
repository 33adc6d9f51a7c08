"""slc: explore how far the weights of a language model compress, and what it costs.

    float weight --Quantizer--> QuantizedTensor --(predictor)--> symbols --rANS--> CompressedTensor
    nn.Linear --CompressedLinear.from_linear(spec)--> CompressedLinear (quantized | entropy | lowrank)
    model --compress_model(policy)--> compressed model --save_compressed--> file --load_compressed--> model

Modules, bottom up (each imports only the ones before it): errors, rans, symbols, quant,
lossless, tensor, gptq, ecsq, hf, factors, kernels, nn, models, calibrate, lagrange, lowrank,
allocate, compress, integrity, checkpoint, blockwise, then metrics, memory, viz, gguf_peers, demo, render, cli.
"""
from .errors import FormatError
from .quant import QuantizedTensor, Quantizer
from .tensor import CompressedTensor
from .nn import CompressedEmbedding, CompressedLinear, DecodeCache, LinearSpec, TiedLinear
from .lowrank import LowRank, allocate_ranks, low_rank
from .compress import CompressionReport, compress_model, compressed_layers, lowrank_policy
from .checkpoint import load_compressed, save_compressed
from .streaming import compress_checkpoint, open_checkpoint, write_synthetic_checkpoint
from .allocate import Allocation
# slc.allocate / slc.compress_model_gptq take a model or a checkpoint path (then block by block, slc.blockwise);
# the function shadows the submodule name on purpose (`from slc.allocate import allocate` is the model form)
from .blockwise import allocate, compress_model_gptq
from .recipe import BudgetCalibration, BudgetReport, calibrate_for_budget, compress_to_budget
from . import metrics, memory, models, rans

__all__ = [
    "FormatError", "Quantizer", "QuantizedTensor", "CompressedTensor",
    "CompressedLinear", "CompressedEmbedding", "DecodeCache", "LinearSpec", "TiedLinear",
    "LowRank", "allocate_ranks", "low_rank",
    "CompressionReport", "compress_model", "compress_model_gptq", "compressed_layers", "load_compressed",
    "lowrank_policy", "save_compressed", "allocate", "Allocation", "metrics", "memory", "models", "rans",
    "compress_checkpoint", "open_checkpoint", "write_synthetic_checkpoint",
    "compress_to_budget", "BudgetReport", "calibrate_for_budget", "BudgetCalibration",
]
__version__ = "0.1.0"
