"""The runnable examples in the public docstrings must stay true."""
import doctest
import importlib
import pkgutil

import pytest

import slc

MODULES = sorted(m.name for m in pkgutil.iter_modules(slc.__path__, "slc.")
                 if m.name not in ("slc.demo", "slc.render"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_public_classes_have_examples():
    for cls in (slc.Quantizer, slc.CompressedTensor, slc.CompressedLinear, slc.LinearSpec):
        assert ">>>" in (cls.__doc__ or ""), f"{cls.__name__} needs a runnable example in its docstring"
