"""``hippolm distill`` on a tiny saved Llama model with a tiny offline tokenizer (CPU)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hippolm import AHNForCausalLM
from hippolm.train import PackedTokens, SampleOrder, distill_loss, next_token_labels
from hippolm.train import distill as D
from hippolm.train.data import rank_batch

WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator([" ".join([*WORDS, "user", "assistant"])], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                   pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    return fast


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A tiny Llama (initialised with larger weights than usual, so attention is sharp and the
    context past the window changes its predictions) with its tokenizer, and small corpora."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("distill")
    tok = make_tokenizer()
    base = root / "base"
    tok.save_pretrained(base)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.15, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(base)
    small = root / "small"  # 4 sequences of 64 tokens: a batch of 4 sees all of them every step
    small.mkdir()
    (small / "a.txt").write_text(words(270, 1))
    corpus = root / "corpus"  # a few documents of several lengths and formats
    corpus.mkdir()
    (corpus / "a.txt").write_text(words(300, 2))
    (corpus / "b.txt").write_text(words(41, 3))
    (corpus / "c.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"text": words(90, 4)},
        {"messages": [{"role": "user", "content": words(30, 5)}, {"role": "assistant", "content": words(20, 6)}]},
        {"text": words(150, 7)},
    ]) + "\n")
    return {"root": root, "base": base, "small": small, "corpus": corpus, "tok": tok,
            "cache": str(root / "hf-cache")}


def args(fx, out, *extra, data=None):
    return ["--base", str(fx["base"]), "--data", str(data or fx["small"]), "--out", str(out),
            "--cache-dir", fx["cache"], "--seq-len", "64", *map(str, extra)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: threads only add overhead (and contention on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- loss -----------------------------------------------------------------------------------------
class RecordingHead(torch.nn.Module):
    """A linear head that records the size of every logits tensor it makes."""

    def __init__(self, d: int, vocab: int):
        super().__init__()
        self.lin = torch.nn.Linear(d, vocab, bias=False)
        self.sizes: list[int] = []

    def forward(self, x):
        y = self.lin(x)
        self.sizes.append(y.numel())
        return y


def naive_loss(head, hs, ht, start, labels, temperature, ce_weight):
    s = head(hs[:, start:])
    t = head(ht[:, start:])
    lt, ls = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean() * temperature**2
    lab = labels[:, start:]
    ce = torch.nn.functional.cross_entropy(s[lab >= 0], lab[lab >= 0])
    return (1 - ce_weight) * kl + ce_weight * ce


@pytest.mark.parametrize(("temperature", "ce_weight"), [(1.0, 0.0), (2.0, 0.3)])
def test_chunked_loss_equals_unchunked_and_bounds_the_logits(temperature, ce_weight):
    torch.manual_seed(0)
    B, T, Dm, V, start, chunk = 2, 40, 16, 50, 5, 8
    head = RecordingHead(Dm, V)
    head.requires_grad_(False)
    hs = torch.randn(B, T, Dm, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(B, T, Dm, dtype=torch.float64)
    head.double()
    labels = next_token_labels(torch.randint(0, V, (B, T)))
    loss, parts = distill_loss(head, hs, ht, start, labels=labels, temperature=temperature, ce_weight=ce_weight,
                               chunk=chunk)
    loss.backward()
    grad = hs.grad.clone()
    # Only chunk x vocab logits at a time, forward and backward (recomputed per chunk).
    n_chunks = -(-B * (T - start) // chunk)
    assert max(head.sizes) <= chunk * V
    assert len(head.sizes) == 4 * n_chunks  # student + teacher, forward and recompute
    hs.grad = None
    head.sizes.clear()
    ref = naive_loss(head, hs, ht, start, labels, temperature, ce_weight)
    ref.backward()
    assert max(head.sizes) == B * (T - start) * V  # the naive form does materialise everything
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad, hs.grad, rtol=1e-9, atol=1e-12)
    assert parts["kl"] > 0 and loss.item() != 0
    # The KL of a distribution with itself is 0; of different ones, positive.
    same, _ = distill_loss(head, ht.clone(), ht, start, chunk=7)
    assert abs(same.item()) < 1e-12


# --- windows --------------------------------------------------------------------------------------
def test_window_plan_defaults_follow_the_paper_and_fixed_mode_checks():
    plan = D.window_plan(8192, None, None, None, None, seed=3)
    assert sorted(plan.options) == [2048, 4096]  # L/8 < W < L
    for w, sinks in plan.options.items():
        assert sinks == [s for s in D.DEFAULT_SINKS if s <= w / 2 and s + w < 8192]
    draws = [plan.sample(i) for i in range(200)]
    assert draws == [plan.sample(i) for i in range(200)]  # a function of (seed, step)
    assert {w for w, _ in draws} == {2048, 4096} and len({s for _, s in draws}) > 3
    assert all(s <= w / 2 for w, s in draws)
    plan = D.window_plan(64, 16, 4, None, None)
    assert plan.fixed and plan.sample(5) == (16, 4)
    for bad in [(64, 60, 4), (64, 64, 0)]:
        with pytest.raises(D.DistillError, match="must exceed"):
            D.window_plan(bad[0], bad[1], bad[2], None, None)
    with pytest.raises(D.DistillError, match="no default window fits"):
        D.window_plan(32, None, None, None, None)


# --- data -----------------------------------------------------------------------------------------
def test_packing_formats_and_sharding(fx, tmp_path):
    tok = fx["tok"]
    import pandas as pd

    pd.DataFrame({"text": [words(70, 8), words(5, 9)]}).to_parquet(tmp_path / "d.parquet")
    files = [fx["corpus"], tmp_path / "d.parquet"]
    data = PackedTokens(files, tok, 32, cache_dir=fx["cache"])
    # The stream: every document tokenised (chat rows through the template), then EOS, in file order.
    eos = tok.eos_token_id
    docs = [(fx["corpus"] / "a.txt").read_text(), (fx["corpus"] / "b.txt").read_text()]
    expected = [tok(d)["input_ids"] + [eos] for d in docs]
    rows = [json.loads(x) for x in (fx["corpus"] / "c.jsonl").read_text().splitlines()]
    for r in rows:
        if r.get("messages"):
            ids = tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
        else:
            ids = tok(r["text"])["input_ids"]
        expected.append(ids + ([eos] if ids[-1] != eos else []))
    expected += [tok(t)["input_ids"] + [eos] for t in (words(70, 8), words(5, 9))]
    stream = [t for doc in expected for t in doc]
    assert data.total_tokens == len(stream) and len(data) == len(stream) // 32
    blocks = torch.cat([data[i] for i in range(len(data))]).tolist()
    assert blocks == stream[: len(data) * 32]  # long documents split, short ones share blocks
    assert any(r.get("messages") for r in rows) and tok.convert_tokens_to_ids("assistant") in stream
    # Order: a permutation per epoch from the seed; ranks take disjoint shards of each step.
    order = SampleOrder(len(data), seed=1)
    epoch0 = [order[q] for q in range(len(data))]
    assert sorted(epoch0) == list(range(len(data))) and epoch0 != list(range(len(data)))
    assert epoch0 == [SampleOrder(len(data), seed=1)[q] for q in range(len(data))]
    r0 = rank_batch(data, order, 0, 0, 0, 2, 2)
    r1 = rank_batch(data, order, 0, 0, 1, 2, 2)
    assert torch.equal(torch.cat([r0, r1]), torch.stack([data[i] for i in epoch0[:4]]))


# --- training -------------------------------------------------------------------------------------
def test_twenty_steps_learn_and_train_only_the_memory(fx, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    res = D.run(args(fx, out, "--window", 16, "--sinks", 4, "--steps", 20, "--batch-size", 4, "--lr", 1e-2,
                     "--warmup", 2, "--save-every", 10, "--kl-chunk", 48))
    losses = [r["loss"] for r in res.history]
    assert len(losses) == 20 and all(np.isfinite(losses))
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    print(f"loss first 3 {first:.4f} -> last 3 {last:.4f}; curve {[round(x, 4) for x in losses]}")
    assert last < 0.8 * first
    # Base weights bit-identical to the saved base; every memory tensor moved.
    fresh = AutoModelForCausalLM.from_pretrained(fx["base"], dtype=torch.float32).state_dict()
    trained = {n: p for n, p in res.model.base.state_dict().items() if ".ahn." not in n}
    assert set(trained) == set(fresh)
    assert all(torch.equal(trained[n], fresh[n]) for n in fresh)
    memory = res.model.memory_state_dict()
    assert all(not torch.equal(memory[n].detach(), res.initial_memory[n]) for n in memory)
    # The run folder: metrics per step, checkpoints, plot, final memory that loads and reproduces.
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21)) and rows[0]["tokens_per_s"] > 0
    assert (out / "loss.png").stat().st_size > 1000
    assert [p.name for p in D.list_checkpoints(out)] == ["step-00000010", "step-00000020"]
    loaded = AHNForCausalLM.from_base(fx["base"], out / "memory")
    assert (loaded.ahn_config.window, loaded.ahn_config.sinks) == (16, 4)
    ids = torch.randint(4, 60, (1, 64))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, res.model(ids).logits)
        # It differs from plain sliding-window attention: the memory learned something.
        swa = AHNForCausalLM.from_base(fx["base"], "gdn", window=16, sinks=4)
        assert (swa(ids).logits - loaded(ids).logits).abs().max() > 1e-3


def test_quiet_shows_no_progress_bar_and_is_not_saved(fx, tmp_path, capfd):
    """--quiet turns the step bar off (tqdm draws it on stderr) and is not kept for --resume."""
    out = tmp_path / "q"
    D.run(args(fx, out, "--window", 16, "--sinks", 4, "--steps", 2, "--quiet"))
    assert "2/2" not in capfd.readouterr().err
    assert "quiet" not in json.loads((out / "args.json").read_text())
    D.run(args(fx, tmp_path / "loud", "--window", 16, "--sinks", 4, "--steps", 2))
    err = capfd.readouterr().err
    assert "distill" in err and "2/2" in err  # the bar, so the check above can fail


def test_gradient_checkpointing_gives_the_same_gradients(fx):
    plan = D.window_plan(64, 16, 4, None, None)
    grads = []
    for checkpointing in (False, True):
        _, model = D.load_model(argparse_ns(fx), torch.device("cpu"), torch.float32, plan)
        with torch.no_grad():  # a non-zero read-out, so every memory tensor gets a gradient
            for n, p in model.memory_state_dict().items():
                if n.endswith("ahn.o_proj"):
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        model.train()
        if checkpointing:
            D.enable_checkpointing(model)
        step = D.DistillStep(model, kl_chunk=16, temperature=1.0, ce_weight=0.2)
        ids = torch.randint(4, 60, (2, 64), generator=torch.Generator().manual_seed(0))
        loss, _, _ = step(ids, 16, 4)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.memory_state_dict().items()})
        assert all(p.grad is None for n, p in model.base.named_parameters() if ".ahn." not in n)
    assert all(grads[0][n].abs().sum() > 0 for n in grads[0])
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-7) for n in grads[0])


def argparse_ns(fx):
    ns, _ = D.parse_args(args(fx, "unused"))
    return ns


def test_resume_is_exact_and_a_crash_mid_save_loses_nothing(fx, tmp_path, monkeypatch):
    common = ("--window-choices", "8,16", "--sink-choices", "0,2,4", "--steps", 6, "--batch-size", 2,
              "--lr", 1e-2, "--save-every", 3, "--keep-checkpoints", 3)
    straight = D.run(args(fx, tmp_path / "a", *common))
    assert len({(r["window"], r["sinks"]) for r in straight.history}) > 1  # windows really sampled
    b = tmp_path / "b"
    first = D.run(args(fx, b, *common, "--stop-after", 3))  # as if killed after step 3's checkpoint
    assert first.steps_run == 3 and not (b / "memory").exists()
    assert [p.name for p in D.list_checkpoints(b)] == ["step-00000003"]
    saved3 = load_file(str(b / "checkpoints/step-00000003/memory.safetensors"))

    real_save = D._save_obj

    def crash_at_step_6(obj, path):
        if "step-00000006" in str(path) and path.name == "scheduler.pt":
            raise OSError("disk full (simulated)")
        real_save(obj, path)

    monkeypatch.setattr(D, "_save_obj", crash_at_step_6)
    with pytest.raises(OSError, match="simulated"):
        D.run(["--out", str(b), "--resume"])
    monkeypatch.setattr(D, "_save_obj", real_save)
    # The half-written checkpoint is not taken for one; the earlier one is intact.
    assert [p.name for p in D.list_checkpoints(b)] == ["step-00000003"]
    assert (b / "checkpoints/.tmp-step-00000006").exists()
    after = load_file(str(b / "checkpoints/step-00000003/memory.safetensors"))
    assert all(torch.equal(saved3[n], after[n]) for n in saved3)

    resumed = D.run(["--out", str(b), "--resume"])  # arguments come from the run's args.json
    assert resumed.steps_run == 3 and not (b / "checkpoints/.tmp-step-00000006").exists()
    a_mem = load_file(str(tmp_path / "a/memory/memory.safetensors"))
    b_mem = load_file(str(b / "memory/memory.safetensors"))
    assert set(a_mem) == set(b_mem)
    assert all(torch.equal(a_mem[n], b_mem[n]) for n in a_mem)  # bit for bit
    a_rows = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    b_rows = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b_rows] == list(range(1, 7))
    assert [r["loss"] for r in a_rows] == [r["loss"] for r in b_rows]
    assert D.main(["--out", str(tmp_path / "a"), "--resume"]) == 0  # nothing left to do

    # Ctrl-C during step 2: the step finishes, a checkpoint is saved, exit code 130; resume is exact.
    real_batch, calls = D.rank_batch, []

    def interrupt_in_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(*a, **k)

    monkeypatch.setattr(D, "rank_batch", interrupt_in_step_2)
    c = tmp_path / "c"
    assert D.main(args(fx, c, *common)) == 130
    monkeypatch.setattr(D, "rank_batch", real_batch)
    assert [p.name for p in D.list_checkpoints(c)] == ["step-00000002"]
    assert D.main(["--out", str(c), "--resume"]) == 0
    c_mem = load_file(str(c / "memory/memory.safetensors"))
    assert all(torch.equal(a_mem[n], c_mem[n]) for n in a_mem)
    # The comparison can fail: three more steps do change the memory.
    assert any(not torch.equal(a_mem[n], saved3[n]) for n in a_mem)


# --- bad input ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(fx):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = fx["root"] / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(fx["tok"]))).save_pretrained(path)
    fx["tok"].save_pretrained(path)
    return path


@pytest.mark.parametrize("case", ["missing", "empty", "too_short", "window", "unconvertible", "no_base",
                                  "bad_json", "exists", "nothing_to_resume"])
def test_bad_input_is_a_clear_error_and_writes_nothing(fx, gpt2_dir, tmp_path, capsys, case):
    out = tmp_path / "run"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text(words(20, 1))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "w1 w2"}\n{"text": \n')
    argv, message = {
        "missing": (args(fx, out, data=tmp_path / "nope.txt"), "data file not found"),
        "empty": (args(fx, out, data=empty), "is empty"),
        "too_short": (args(fx, out, data=short), "fewer than one sequence"),
        "window": (args(fx, out, "--window", 48, "--sinks", 16), "must exceed --window \\+ --sinks"),
        "unconvertible": ([*args(fx, out)[2:], "--base", str(gpt2_dir)], "cannot convert"),
        "no_base": ([*args(fx, out)[2:], "--base", str(tmp_path / "no-model")], "could not load"),
        "bad_json": (args(fx, out, data=bad_json), "could not read the json data"),
        "exists": (args(fx, fx["root"], "--steps", 1), "already holds"),
        "nothing_to_resume": (["--out", str(out), "--resume"], "nothing to resume"),
    }[case]
    code = D.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert __import__("re").search(message, err), err
    assert "Traceback" not in err
    assert not out.exists()


# --- distributed ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    code = D.main(argv)
    if code != 0:
        raise SystemExit(code)


def test_ddp_two_processes_match_one_process_with_twice_the_batch(fx, tmp_path):
    common = ("--window", 16, "--sinks", 4, "--steps", 4, "--lr", 1e-2, "--save-every", 2)
    single = D.run(args(fx, tmp_path / "one", *common, "--batch-size", 4))
    ddp_out = tmp_path / "two"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), args(fx, ddp_out, *common, "--batch-size", 2)),
                                nprocs=2, join=True)
    one = load_file(str(tmp_path / "one/memory/memory.safetensors"))
    two = load_file(str(ddp_out / "memory/memory.safetensors"))
    assert all(torch.allclose(one[n], two[n], rtol=1e-4, atol=1e-6) for n in one)
    assert any(not torch.equal(one[n], single.initial_memory[n]) for n in one)
    rows = [json.loads(x) for x in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone wrote the log
    assert np.allclose([r["loss"] for r in rows], [r["loss"] for r in single.history], rtol=1e-4)
    state = json.loads((ddp_out / "checkpoints/step-00000004/state.json").read_text())
    assert state["world_size"] == 2 and state["samples_seen"] == 16
