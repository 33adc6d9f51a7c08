"""What slc needs to know about transformers models: which modules are linear layers, their
(out, in) weights, which of them are compressed by default, and how to swap one for another.

A linear layer is a torch `nn.Linear` or a transformers `Conv1D` (GPT-2), whose weight is stored
transposed, (in, out). Everything in slc that looks for linear layers asks `is_linear`, and
everything that reads their weight asks `dense_weight_of`, so the two layouts are handled once.

Policies (what compress_model takes) are one spec for every layer, or a dict {fnmatch pattern on
the module name: spec or None}, first match wins; `resolve_spec` is the one reading of that rule.
"""
from __future__ import annotations

import fnmatch

import torch
from torch import nn

DEFAULT_SKIP = ("*embed*", "*wte", "*wpe", "*lm_head*")   # embeddings and the output head stay dense by default


def conv1d_class():
    """transformers' Conv1D class, or None when transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:                                      # transformers is optional for slc.nn
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear or a transformers Conv1D."""
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def dense_weight_of(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or a transformers Conv1D (whose weight is (in, out)), detached."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach()
    conv1d = conv1d_class()
    if conv1d is not None and isinstance(layer, conv1d):
        return layer.weight.detach().T
    raise TypeError(f"expected torch.nn.Linear or transformers Conv1D, got {type(layer).__name__}")


def skipped(name: str, skip=DEFAULT_SKIP) -> str | None:
    """The first `skip` pattern that matches module `name`, or None."""
    return next((p for p in skip if fnmatch.fnmatchcase(name, p)), None)


def target_layers(model: nn.Module, skip=None) -> dict[str, nn.Module]:
    """The layers compress_model compresses by default: every Linear / Conv1D but embeddings and lm_head."""
    skip = DEFAULT_SKIP if skip is None else skip
    return {n: m for n, m in model.named_modules() if is_linear(m) and skipped(n, skip) is None}


def resolve_spec(name: str, policy, skip=()) -> tuple[object | None, str | None, str]:
    """(spec or None, the pattern that decided, why it stays dense) for module `name` under `policy`.

    `skip` patterns are checked first; a policy that is not a dict applies to every layer; in a dict
    the first fnmatch pattern that matches wins and None means "leave dense".
    """
    pat = skipped(name, skip)
    if pat is not None:
        return None, None, f"default skip {pat!r}"
    if not isinstance(policy, dict):
        return policy, None, ""
    for pat, spec in policy.items():
        if fnmatch.fnmatchcase(name, pat):
            return spec, pat, "" if spec is not None else f"policy {pat!r} -> None"
    return None, None, "no policy pattern matched"


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` ("model.layers.0.mlp.up_proj") by `module`."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def has_lm_head(model: nn.Module) -> bool:
    """Whether `model` has an output head over the vocabulary (a causal LM such as SmolLM2), not a bare encoder
    (a sentence model such as MiniLM)."""
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out is not None and get_out() is not None


def tied_head(model: nn.Module) -> str | None:
    """Name of the output head whose weight IS the input embedding's (tie_word_embeddings), else None."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return None
    inp, out = get_in(), get_out()
    head_weight = None if out is None else getattr(out, "weight", None)
    if inp is None or head_weight is None or head_weight is not getattr(inp, "weight", None):
        return None
    return next(n for n, m in model.named_modules() if m is out)
