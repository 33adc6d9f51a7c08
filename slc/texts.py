"""Texts of several kinds, offline: a calibration mix and evaluation sets disjoint from it in source.

`slc.models.calibration_text()` and `evaluation_text()` are two slices of the same pydoc topics:
a method fitted on one is measured on text of the very same kind. Here every text is assembled from
*documents* (one pydoc topic, one module's docstrings, one package's README, one module's source),
each named by (domain, source), and a source used for calibration is never used for evaluation:

    domain      what a document is                                          used for
    pydoc       one topic of the standard library's pydoc_data.topics       calibration (even topics),
                                                                            in-domain evaluation (odd topics)
    docstrings  inspect.getdoc of one stdlib module and its public names   calibration
    readmes     the long description (README) an installed package ships    out-of-domain evaluation ("prose")
    licences    the licence files an installed package ships (deduped)     out-of-domain evaluation ("prose")
    source      the Python source of one stdlib module                      out-of-domain evaluation ("code")

Every install of slc has all of it: the standard library, and the packages slc depends on (their
versions are pinned by requirements.lock, so the texts are the same wherever the lock was installed).
Module and package lists are fixed and sorted; documents are interleaved round-robin across domains
and sources, each cut to at most DOC_CHARS at a line end, so the first n characters of a text already
hold many sources; sizes are in characters.

    cal = calibration_mix(16_000)                  # pydoc (even topics) + stdlib docstrings
    sets = evaluation_sets(12_000)                 # {"in-domain": ..., "prose": ..., "code": ...}
    domains()                                      # {domain: one-line description}
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass
from functools import lru_cache

DOC_CHARS = 2_000          # at most this much of one document: many sources in a few thousand characters

# stdlib modules whose docstrings calibrate (never evaluated; their source is never used either)
DOCSTRING_MODULES = (
    "argparse", "base64", "collections", "csv", "datetime", "decimal", "email.message", "functools", "glob",
    "gzip", "hashlib", "html.parser", "http.client", "inspect", "io", "itertools", "json", "logging", "math",
    "os", "pathlib", "pickle", "re", "shutil", "socket", "sqlite3", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "time", "unittest", "urllib.parse", "zipfile",
)
# stdlib modules whose source is the out-of-domain "code" set (disjoint from DOCSTRING_MODULES)
SOURCE_MODULES = (
    "abc", "bisect", "calendar", "colorsys", "contextlib", "copy", "dataclasses", "difflib", "enum",
    "fnmatch", "fractions", "graphlib", "heapq", "ipaddress", "numbers", "operator", "pprint", "queue",
    "random", "reprlib", "sched", "secrets", "selectors", "shlex", "statistics", "timeit", "tokenize",
    "types", "uuid", "weakref",
)
# installed packages whose READMEs and licences are the out-of-domain "prose" set: slc's own dependencies
# and theirs, so every install has them
PACKAGES = (
    "accelerate", "dask", "filelock", "fsspec", "gguf", "huggingface-hub", "jinja2", "llvmlite", "numba",
    "numpy", "packaging", "psutil", "pyyaml", "regex", "requests", "safetensors", "sentencepiece", "tokenizers",
    "torch", "tqdm", "transformers", "zstandard",
)
DOMAINS = {
    "pydoc": "topics of the standard library's pydoc_data.topics (Python reference prose)",
    "docstrings": f"inspect.getdoc of {len(DOCSTRING_MODULES)} standard-library modules and their public names",
    "readmes": f"long descriptions (READMEs) of {len(PACKAGES)} installed packages (importlib.metadata)",
    "licences": "the packages' own licence files (not vendored third-party ones), each distinct text once",
    "source": f"Python source of {len(SOURCE_MODULES)} standard-library modules",
}
# which domains (and which part of pydoc) make each text
CALIBRATION = (("pydoc", 0), ("docstrings", None))
EVALUATION = {"in-domain": (("pydoc", 1),), "prose": (("readmes", None), ("licences", None)),
              "code": (("source", None),)}


@dataclass(frozen=True)
class Doc:
    """One document: its domain, its source (topic, module or package) and its text."""
    domain: str
    source: str
    text: str


def domains() -> dict[str, str]:
    """{domain: what its documents are}; CALIBRATION / EVALUATION say which texts use which."""
    return dict(DOMAINS)


def _cut(text: str, n: int = DOC_CHARS) -> str:
    """At most n characters, ending at a line end where there is one."""
    text = text.strip()
    if len(text) <= n:
        return text
    end = text.rfind("\n", 0, n)
    return text[:end if end > n // 2 else n].rstrip()


def _pydoc() -> list[Doc]:
    from pydoc_data.topics import topics

    return [Doc("pydoc", k, topics[k]) for k in sorted(topics)]


def _docstrings(name: str) -> str:
    mod = importlib.import_module(name)
    parts = [inspect.getdoc(mod) or ""]
    for attr in sorted(n for n in dir(mod) if not n.startswith("_")):
        obj = getattr(mod, attr, None)
        if getattr(obj, "__module__", None) != mod.__name__ or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        doc = inspect.getdoc(obj)
        if doc:
            parts.append(f"{attr}: {doc}")
    return "\n\n".join(p for p in parts if p)


def _source(name: str) -> str:
    return inspect.getsource(importlib.import_module(name))


def _distribution(name: str):
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _readme(name: str) -> str:
    dist = _distribution(name)
    if dist is None:
        return ""
    return dist.metadata.get_payload() or dist.metadata.get("Description") or ""


def _licences(name: str) -> list[tuple[str, str]]:
    dist = _distribution(name)
    out = []
    for f in sorted(dist.files or [], key=str) if dist is not None else []:
        base = f.name.lower()
        top = f.parts[0].endswith(".dist-info") and len(f.parts) <= 3       # the package's own, not vendored ones
        if top and base.startswith(("licen", "copying", "notice")):
            try:
                out.append((str(f), f.locate().read_text(encoding="utf-8", errors="replace")))
            except OSError:
                continue
    return out


@lru_cache(maxsize=None)
def documents(domain: str) -> tuple[Doc, ...]:
    """Every document of a domain, in a fixed order (sorted sources); empty documents are left out."""
    if domain == "pydoc":
        docs = _pydoc()
    elif domain == "docstrings":
        docs = [Doc(domain, m, _docstrings(m)) for m in DOCSTRING_MODULES]
    elif domain == "source":
        docs = [Doc(domain, m, _source(m)) for m in SOURCE_MODULES]
    elif domain == "readmes":
        docs = [Doc(domain, p, _readme(p)) for p in PACKAGES]
    elif domain == "licences":
        seen, docs = set(), []
        for p in PACKAGES:
            for path, text in _licences(p):
                digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
                if digest not in seen:                         # Apache-2.0 ships with many packages: once
                    seen.add(digest)
                    docs.append(Doc(domain, f"{p}:{path}", text))
    else:
        raise ValueError(f"unknown domain {domain!r}: use one of {sorted(DOMAINS)}")
    return tuple(d for d in docs if d.text.strip())


def _select(parts) -> list[list[Doc]]:
    """One list of documents per (domain, half): half 0 / 1 = even / odd documents, None = all."""
    out = []
    for domain, half in parts:
        docs = documents(domain)
        out.append(list(docs if half is None else docs[half::2]))
    return out


def _interleave(groups: list[list[Doc]]) -> list[Doc]:
    """Round-robin across the groups (domains), in order within each."""
    out, i = [], 0
    while any(i < len(g) for g in groups):
        out += [g[i] for g in groups if i < len(g)]
        i += 1
    return out


def assemble(docs: list[Doc], n_chars: int) -> str:
    """The first n_chars characters of the documents, each cut to DOC_CHARS, separated by blank lines."""
    if isinstance(n_chars, bool) or not isinstance(n_chars, int) or n_chars < 1:
        raise ValueError(f"n_chars={n_chars!r} must be an int >= 1 (characters of text)")
    pieces, size = [], 0
    for d in docs:
        piece = _cut(d.text)
        pieces.append(piece)
        size += len(piece) + 2
        if size >= n_chars:
            break
    text = "\n\n".join(pieces)
    if len(text) < n_chars:
        raise ValueError(f"only {len(text)} characters of text are available here; ask for at most that many")
    return text[:n_chars]


def calibration_documents() -> list[Doc]:
    """The calibration mix's documents in the order they are used."""
    return _interleave(_select(CALIBRATION))


def evaluation_documents(name: str) -> list[Doc]:
    """The documents of one evaluation set ("in-domain", "prose" or "code"), in order."""
    if name not in EVALUATION:
        raise ValueError(f"unknown evaluation set {name!r}: use one of {sorted(EVALUATION)}")
    return _interleave(_select(EVALUATION[name]))


def calibration_mix(n_chars: int = 16_000) -> str:
    """n_chars characters of calibration text: pydoc topics (even ones) and stdlib docstrings, interleaved."""
    return assemble(calibration_documents(), n_chars)


def evaluation_sets(n_chars: int = 12_000) -> dict[str, str]:
    """{"in-domain": held-out pydoc topics, "prose": package READMEs + licences, "code": stdlib source},
    n_chars characters each, none sharing a source with `calibration_mix`."""
    return {name: assemble(evaluation_documents(name), n_chars) for name in EVALUATION}


def used_sources(docs: list[Doc], n_chars: int) -> set[tuple[str, str]]:
    """(domain, source) of the documents that the first n_chars characters of `assemble(docs)` draw on."""
    out, size = set(), 0
    for d in docs:
        out.add((d.domain, d.source))
        size += len(_cut(d.text)) + 2
        if size >= n_chars:
            break
    return out
