"""The runnable examples in the runtime's docstrings are run, so they stay true."""

import doctest

import pytest

import perco.engine.codec
import perco.engine.entropy.tables
import perco.engine.noise
import perco.engine.text


@pytest.mark.parametrize("module", [perco.engine.entropy.tables, perco.engine.text, perco.engine.noise,
                                    perco.engine.codec])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    if module is not perco.engine.codec:  # codec's example needs a real checkpoint: skipped there
        assert result.attempted > 0
