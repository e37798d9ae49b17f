"""``hippolm eval`` end to end on a tiny random model (CPU), resuming, errors; ``hippolm cost`` output."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from eval_tiny import save_tiny, tiny_llama

from hippolm import cli
from hippolm.eval import perplexity_by_position
from hippolm.eval.cli import main as eval_main

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_eval_end_to_end_and_resume(tiny_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lighthouse keeper counted the ships that passed the harbor every night. " * 4)
    out = tmp_path / "out"
    argv = ["eval", "--base", str(tiny_dir), "--window", "16", "--sinks", "2", "--systems", "full,swa,ahn",
            "--task", "ppl,passkey", "--task", f"longbench:{FIXTURES / 'longbench' / 'narrativeqa.jsonl'}",
            "--lengths", "400", "--depths", "0,1", "--buckets", "32,128", "--data", str(doc),
            "--max-new-tokens", "4", "--batch-size", "2", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 0
    assert "untrained" in capsys.readouterr().err  # a fresh memory: ahn equals swa, and the user is told

    for system in ("full", "swa", "ahn"):
        rows = lines(out / "passkey" / f"{system}.jsonl")
        assert sorted(r["id"] for r in rows) == ["passkey/L400/d0/s0", "passkey/L400/d1/s0"]
        assert all(r["tokens"] <= 400 and 0.0 <= r["score"] <= 1.0 and "output" in r for r in rows)
        assert (out / "passkey" / f"heatmap_{system}.png").read_bytes()[:4] == b"\x89PNG"
        assert len(lines(out / "longbench" / "narrativeqa" / f"{system}.jsonl")) == 2
    # full-attention ppl equals the base model's own, computed directly
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = torch.tensor(tok(doc.read_text())["input_ids"][:128])
    direct = perplexity_by_position(tiny_llama(), ids, [32, 128], progress=False)["ppl"]
    summary = json.loads((out / "summary.json").read_text())
    ppl = {(r["group"], r["system"]): r["value"] for r in summary if r["task"] == "ppl"}
    assert [ppl[("0-32", "full")], ppl[("32-128", "full")]] == pytest.approx(direct, rel=1e-5)
    assert ppl[("32-128", "swa")] == pytest.approx(ppl[("32-128", "ahn")], rel=1e-9)  # untrained memory
    assert ppl[("32-128", "swa")] != pytest.approx(ppl[("32-128", "full")], rel=1e-6)
    md = (out / "summary.md").read_text()
    assert md.splitlines()[0] == "| task | group | metric | full | swa | ahn | n |"
    assert "| ppl | 32-128 | ppl |" in md and "| passkey | 400 | score |" in md and "| longbench | narrativeqa |" in md
    with (out / "summary.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(summary) == 2 * 3 + 3 + 3

    # resume: nothing is generated again; a sample lost from a file is redone, alone
    path = out / "passkey" / "ahn.jsonl"
    kept = path.read_text().splitlines()
    path.write_text(kept[0] + "\n" + '{"id": "passkey/L400/d1/s0", "cut by a cra')  # a truncated last line
    before = {p: p.read_text() for p in out.rglob("*.jsonl") if p != path}
    assert cli.main(argv) == 0
    assert {p: p.read_text() for p in out.rglob("*.jsonl") if p != path} == before
    redone = lines_lenient(path)
    assert [r["id"] for r in redone] == ["passkey/L400/d0/s0", "passkey/L400/d1/s0"]
    assert json.loads((out / "summary.json").read_text()) == summary
    # results of other settings are never mixed in: another window in the same --out is refused
    other = [a if a != "16" else "24" for a in argv]
    assert cli.main(other) == 2
    assert "other settings (--window 16 -> 24)" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text()) == summary


def lines_lenient(path: Path) -> list[dict]:
    out = []
    for x in path.read_text().splitlines():
        try:
            out.append(json.loads(x))
        except json.JSONDecodeError:
            continue
    return out


def test_eval_errors_name_what_to_do(tiny_dir, tmp_path, capsys):
    base = ["--base", str(tiny_dir), "--out", str(tmp_path / "o"), "--quiet"]
    assert eval_main([*base, "--task", "longbench:/nonexistent/narrativeqa.jsonl"]) == 2
    assert "Download the benchmark's JSONL" in capsys.readouterr().err
    assert eval_main([*base, "--task", "needles"]) == 2
    assert "unknown task 'needles'" in capsys.readouterr().err
    assert eval_main([*base, "--task", "passkey", "--systems", "full,dense"]) == 2
    assert "unknown system 'dense'" in capsys.readouterr().err
    assert eval_main([*base, "--task", "mqar"]) == 2
    assert "hippolm mqar" in capsys.readouterr().err
    assert eval_main([*base, "--task", "niah_multiquery", "--lengths", "200"]) == 2
    assert "shorter than the prompt" in capsys.readouterr().err
    for bad, says in ((["--limit", "-1"], "--limit must be >= 1"), (["--max-new-tokens", "0"], "--max-new-tokens must"),
                      (["--device", "foo"], "--device 'foo' is not a device")):
        assert eval_main([*base, "--task", "passkey", *bad]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # input errors stop before anything is written


def test_eval_mqar_on_a_saved_standalone_model(tmp_path):
    from hippolm.models import HippoConfig, HippoForCausalLM
    from hippolm.tasks.mqar import _seed, evaluate, mqar_data

    torch.manual_seed(0)
    model = HippoForCausalLM(HippoConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, mixer="gdn",
                                         max_position=64)).eval()
    model.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    assert eval_main(["--base", str(tmp_path / "m"), "--task", "mqar", "--lengths", "64", "--pairs", "4,8",
                      "--mqar-examples", "16", "--out", str(out), "--quiet"]) == 0
    rows = {r["group"]: r for r in json.loads((out / "summary.json").read_text())}
    x, y = mqar_data(16, 64, 8, vocab_size=64, seed=_seed("eval", 0, 64, 8))
    assert rows["L64 pairs=8"]["value"] == pytest.approx(evaluate(model, x, y))
    assert rows["L64 pairs=4"]["system"] == "model" and rows["L64 pairs=4"]["n"] == 16


def test_generation_limit_caps_each_samples_own(monkeypatch):
    """--max-new-tokens caps each sample's own limit (a passkey's 16 stays 16 under a cap of 64)."""
    from hippolm.eval import runner

    asked = []
    monkeypatch.setattr(runner, "generate_batch", lambda model, tok, prompts, max_new_tokens, **kw:
                        asked.append(max_new_tokens) or ["x"] * len(prompts))
    samples = [{"id": "a", "prompt": "p", "max_new_tokens": 6}, {"id": "b", "prompt": "q", "max_new_tokens": 1200}]
    model = torch.nn.Linear(1, 1)
    runner.run_generation(model, None, samples, lambda s, o: {}, max_new_tokens=64, progress=False)
    assert sorted(asked) == [6, 64]
    asked.clear()
    runner.run_generation(model, None, samples, lambda s, o: {}, progress=False)
    assert sorted(asked) == [6, 1200]


def test_cli_number_checks_exit_2(capsys, tmp_path):
    """Bad numbers stop with one message and exit code 2, before any model is loaded or trained."""
    for argv, says in ((["mqar", "--pairs", "0"], "pairs must be numbers >= 1"),
                       (["mqar", "--batch-size", "0"], "batch_size must be >= 1"),
                       (["mqar", "--steps", "0"], "steps must be >= 1"),
                       (["mqar", "--seq-len", "4", "--pairs", "4"], "seq_len 4 is too short"),
                       (["mqar", "--vocab", "2", "--pairs", "4"], "too few keys"),
                       (["mqar", "--lr", "-1"], "lr must be > 0"),
                       (["mqar", "--device", "foo"], "is not a device"),
                       (["mqar", "--d-model", "63", "--heads", "2"], "not divisible"),
                       (["mqar", "--mixer", "swa", "--window", "-1"], "window must be a positive int"),
                       (["generate", "hi", "--sinks", "8", "--base", str(tmp_path)], "--sinks sets the sinks"),
                       (["generate", "hi", "--base", "./no_such_model"], "no such file or folder"),
                       (["cost", "--base", "./no_such_model"], None)):
        if says is None:  # cost reports through its parser
            with pytest.raises(SystemExit) as e:
                cli.main(argv)
            assert e.value.code == 2 and "no such file or folder" in capsys.readouterr().err
            continue
        assert cli.main(argv) == 2, argv
        assert says in capsys.readouterr().err
    for bad, says in ((["--min-lr-ratio", "-5"], "--min-lr-ratio must lie in [0, 1]"),
                      (["--lr", "inf"], "--lr must be a finite number > 0"),
                      (["--warmup", "nan"], "--warmup must be a finite number >= 0"),
                      (["--max-grad-norm", "nan"], "--max-grad-norm must be"),
                      (["--temperature", "nan"], "--temperature must be"),
                      (["--device", "foo"], "is not a device")):
        assert cli.main(["distill", "--out", str(tmp_path / "run"), "--steps", "1", *bad]) == 2, bad
        assert says in capsys.readouterr().err
    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 64}')
    with pytest.raises(SystemExit) as e:  # cost reports through its parser, as its other input errors
        cli.main(["cost", "--base", str(config)])
    assert e.value.code == 2 and "has no model_type" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path (measurement skipped)")
def test_cost_cli(capsys, tmp_path):
    argv = ["cost", "--base", "qwen2.5-3b", "--window", "32640", "--sinks", "128", "--memory", "gdn",
            "--context", "131072"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "qwen2.5-3b (qwen2): 36 layers, hidden 2048, 16 query / 2 KV heads x 128" in text
    assert "128 sinks + 32640 window = 32768 tokens lossless; context 131,072 tokens" in text
    cache_line = next(x for x in text.splitlines() if x.startswith("cache at 131,072 tokens"))
    assert cache_line.split()[-1] == "27.4%"  # what our cache holds: -72.6% (the paper's convention: -74.0%)
    assert "measured peak memory: skipped (no CUDA device)" in text
    assert cli.main([*argv, "--json", str(tmp_path / "c.json")]) == 0
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["measured"] is None and data["measured_skipped"] == "no CUDA device"
    assert math.isclose(data["ratios"]["cache"], 0.27435, abs_tol=1e-4)
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--measure", "on"])
    assert e.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err
    assert cli.main([*argv, "--measure", "off"]) == 0
    assert "skipped (--measure off)" in capsys.readouterr().out


def test_cost_measurement_path_runs_on_cpu():
    """The GPU measurement's model building and prefill + decode run (here on CPU, tiny config)."""
    from transformers import LlamaConfig

    from hippolm.eval.cost import build_model, run_system

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = build_model(config, "gdn", window=8, sinks=2, dtype=torch.float32, device="cpu")
    ids = torch.randint(1, 64, (1, 40))
    for window, sinks in ((41, 0), (8, 2)):
        cache = run_system(model, ids, window, sinks, chunk_size=16)
        assert cache.get_seq_length() == 40  # 39 prefilled + the last prompt token decoded
        assert cache.layers[0].keys.shape[2] == window + sinks  # the bounded buffer
