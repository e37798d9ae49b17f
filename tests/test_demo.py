"""``hippolm demo --tiny`` end to end on the real built-in model and corpus, and ``hippolm generate``."""

from __future__ import annotations

import json
import math
import re

import pytest

from hippolm import demo as Demo
from hippolm.cli import main as cli


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The tiny demo, interrupted after one distillation step (as Ctrl-C would) and then re-run:
    returns (run folder, stderr of the interrupted run, stderr of the resumed run)."""
    from hippolm.train import distill as D

    out = tmp_path_factory.mktemp("demo") / "run"
    argv = ["--tiny", "--out", str(out), "--device", "cpu", "--quiet"]
    real_run = D.run

    def interrupted(args):
        res = real_run([*args, "--stop-after", "1"])
        res.exit_code = D.EXIT_INTERRUPTED  # what distill returns after a Ctrl-C
        return res

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(D, "run", interrupted)
        assert Demo.main(argv) == 130
    assert D.list_checkpoints(out / "distill") and not (out / "distill" / "memory").exists()
    assert Demo.main(argv) == 0
    return out


def test_demo_writes_report_plots_and_numbers(demo_run, capsys):
    out = demo_run
    summary = json.loads((out / "summary.json").read_text())
    ppl = summary["perplexity"]
    assert set(ppl) == {"full", "swa", "ahn"}
    for name, r in ppl.items():
        assert all(math.isfinite(x) and 1 < x < 5000 for x in r["ppl"]), (name, r)
    s = summary["settings"]
    # Before sinks + window fills, all three systems are the same computation.
    assert ppl["full"]["ppl"][0] == pytest.approx(ppl["swa"]["ppl"][0], rel=1e-4)
    assert ppl["ahn"]["ppl"][0] == pytest.approx(ppl["swa"]["ppl"][0], rel=1e-4)
    assert ppl["ahn"]["ppl"][-1] != ppl["swa"]["ppl"][-1]  # the trained memory is read
    assert s["buckets"][1] <= s["window"] + s["sinks"]
    assert {k: v["samples"] for k, v in summary["needle"].items()} == {"full": 1, "swa": 1, "ahn": 1}
    rows = summary["costs"]["rows"]
    assert rows[-1]["ahn_cache_bytes"] < rows[-1]["full_cache_bytes"] / 10
    assert rows[-1]["ahn_flops_per_token"] < rows[-1]["full_flops_per_token"]
    gen = summary["generation"]
    assert gen["new_tokens"] >= 1 and gen["cache_first"] == gen["cache_last"] > 0  # flat
    assert (out / "distill" / "memory" / "memory.safetensors").is_file()

    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| full attention") or
             line.startswith("| SWA-only") or line.startswith("| AHN")]
    assert len(table) == 3
    assert all(len(re.findall(r"\d+\.\d\d", line)) >= len(s["buckets"]) - 1 for line in table)
    for png in ("ppl_by_position.png", "cache_flops.png", "needle_full.png", "needle_swa.png", "needle_ahn.png",
                "distill/loss.png"):
        path = out / png
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in report or png.startswith("distill/") or png.startswith("needle")


def test_demo_rerun_reuses_every_stage_and_refuses_other_settings(demo_run, capsys):
    before = json.loads((demo_run / "timings.json").read_text())
    assert Demo.main(["--tiny", "--out", str(demo_run), "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr()
    assert "done earlier" in out.err and "Report:" in out.out
    after = json.loads((demo_run / "timings.json").read_text())
    assert after["distill"] == before["distill"] and after["ppl_ahn"] == before["ppl_ahn"]
    assert Demo.main(["--tiny", "--out", str(demo_run), "--window", "8", "--device", "cpu", "--quiet"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_demo_bad_input(tmp_path, capsys):
    assert Demo.main(["--tiny", "--out", str(tmp_path / "x"), "--window", "200"]) == 2
    assert "--seq-len 64 must exceed window + sinks = 204" in capsys.readouterr().err
    assert Demo.main(["--tiny", "--out", str(tmp_path / "x"), "--window", "200", "--seq-len", "300"]) == 2
    assert "--eval-len 128 must exceed window + sinks = 204" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "notes.txt").write_text("mine")
    assert Demo.main(["--tiny", "--out", str(tmp_path / "y")]) == 2
    assert "not a demo run folder" in capsys.readouterr().err
    assert Demo.main(["--tiny", "--out", str(tmp_path / "y"), "--restart"]) == 2  # deletes only a demo's folder
    assert "not a demo run folder" in capsys.readouterr().err
    assert (tmp_path / "y" / "notes.txt").read_text() == "mine"


def test_demo_resumed_the_interrupted_distillation(demo_run):
    steps = [json.loads(line)["step"] for line in (demo_run / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # step 1 before the interruption, step 2 after: nothing repeated or lost
    args = json.loads((demo_run / "distill" / "args.json").read_text())
    assert args["base"] == "builtin" and args["data"][0].endswith("train.jsonl")


def test_generate_with_the_trained_memory_and_full_attention(demo_run, capsys):
    memory = demo_run / "distill" / "memory"
    assert cli(["generate", "The capital of France is", "--raw", "--memory", str(memory), "--max-new-tokens", "4",
                "--no-stream", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "gdn memory + sinks 4 + window 16" in captured.err and "cache held" in captured.err
    assert captured.out.strip()
    prompt = demo_run / "prompt.txt"
    prompt.write_text("Paris is the capital of France. " * 20)
    assert cli(["generate", "--prompt-file", str(prompt), "Which city?", "--max-new-tokens", "3", "--no-stream"]) == 0
    err = capsys.readouterr().err
    assert "full attention" in err
    held, full = re.search(r"cache held: ([\d.]+ \w+); full attention at [\d,]+ tokens: ([\d.]+ \w+)", err).groups()
    assert held.split()[1] == full.split()[1]  # a full-attention cache is the size of full attention
