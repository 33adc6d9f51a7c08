"""slc.texts: the calibration mix and evaluation sets share no source, are deterministic and sized in characters."""
import pytest

from slc import models, texts


def _sources(docs):
    return {(d.domain, d.source) for d in docs}


def test_domains_listed_and_nonempty():
    assert set(texts.domains()) == {"pydoc", "docstrings", "readmes", "licences", "source"}
    for d in texts.domains():
        docs = texts.documents(d)
        assert len(docs) >= 10, d
        assert [x.source for x in docs] == sorted(x.source for x in docs) or d == "licences"


@pytest.mark.parametrize("name", sorted(texts.EVALUATION))
def test_evaluation_shares_no_source_with_calibration(name):
    cal = _sources(texts.calibration_documents())
    ev = _sources(texts.evaluation_documents(name))
    assert ev and not cal & ev
    # a module whose docstrings calibrate never appears as source (its source holds those docstrings)
    assert not set(texts.DOCSTRING_MODULES) & set(texts.SOURCE_MODULES)
    if name != "in-domain":                       # out of domain: not even the same kinds of document
        assert not {d for d, _ in cal} & {d for d, _ in ev}


def test_no_long_passage_of_an_evaluation_set_is_in_the_calibration_mix():
    cal = texts.calibration_mix(64_000)
    for name, text in texts.evaluation_sets(12_000).items():
        pieces = [text[i:i + 120] for i in range(0, len(text) - 120, 600)]
        shared = [p for p in pieces if p in cal]
        assert not shared, (name, shared[:2])


def test_sizes_and_determinism():
    a, b = texts.calibration_mix(5_000), texts.calibration_mix(5_000)
    assert a == b and len(a) == 5_000
    assert texts.calibration_mix(20_000).startswith(a)
    sets = texts.evaluation_sets(3_000)
    assert set(sets) == {"in-domain", "prose", "code"}
    assert all(len(t) == 3_000 for t in sets.values())
    assert sets == texts.evaluation_sets(3_000)
    used = texts.used_sources(texts.calibration_documents(), 16_000)
    assert {d for d, _ in used} == {"pydoc", "docstrings"} and len(used) >= 8     # many sources early on


def test_bad_sizes_say_what_to_do():
    with pytest.raises(ValueError, match="n_chars"):
        texts.calibration_mix(0)
    with pytest.raises(ValueError, match="at most"):
        texts.evaluation_sets(10_000_000)
    with pytest.raises(ValueError, match="unknown domain"):
        texts.documents("poetry")


def test_legacy_texts_unchanged():
    from pydoc_data.topics import topics
    joined = "\n\n".join(topics[k] for k in sorted(topics))
    assert models.evaluation_text(1000) == joined[:1000]
    assert models.calibration_text(500) == joined[200_000:200_500]
