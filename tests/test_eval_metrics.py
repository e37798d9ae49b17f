"""Benchmark metrics on hand-computed cases, and the LongBench / LV-Eval / InfiniteBench loaders on fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_tiny import char_tokenizer

from hippolm.eval import longbench as LB
from hippolm.eval import metrics as M

FIXTURES = Path(__file__).parent / "fixtures"


# ------------------------------------------------------------------------------------------------
# Metrics


def test_normalize_and_qa_f1():
    assert M.normalize_answer("The Cat's  hat, an Apple!") == "cats hat apple"
    # pred tokens [cat, sat, on, mat], reference [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert M.qa_f1("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    assert M.qa_f1("dog", "cat") == 0.0
    # multiset overlap: "a a b" vs "a b b" share a and b once each: P = R = 2/3
    assert M.token_f1(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(2 / 3)


def test_lveval_keyword_gate():
    # keyword recall 1 -> plain F1 of [paris, is, capital] vs [paris, capital, of, france]: P 2/3, R 1/2 -> 4/7
    assert M.lveval_qa_f1("Paris is the capital", "Paris, capital of France", "Paris") == pytest.approx(4 / 7)
    # the same prediction, keywords absent from it: gated to 0 although the F1 alone is positive
    assert M.qa_f1("Paris is the capital", "Paris, capital of France") > 0.5
    assert M.lveval_qa_f1("Paris is the capital", "Paris, capital of France", "Lyon Marseille") == 0.0
    # blacklisted words do not count as keyword hits: 'and' matched, 'lyon' not -> recall 0 < 0.2
    assert M.lveval_qa_f1("and Paris", "Paris", "and Lyon") == 0.0
    # 1 of 5 keywords = 0.2 passes the gate (strictly below 0.2 fails)
    assert M.lveval_qa_f1("paris", "paris", "paris lyon nice metz lille") == pytest.approx(1.0)
    assert M.lveval_qa_f1("paris", "paris", "paris lyon nice metz lille brest") == 0.0
    # no keywords: plain F1
    assert M.lveval_qa_f1("red car", "red car", None) == pytest.approx(1.0)


def test_rouge_l_matches_the_rouge_package_rules():
    # one sentence each: distinct words 5 and 5, LCS "the cat on the mat" -> distinct hits 4: P = R = 0.8
    assert M.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8, abs=1e-7)
    # summary level: each reference sentence takes the union of its LCS with every predicted sentence, so
    # "a b. c d" vs "a c. b d" scores 1 (the whole-string LCS would give 0.75)
    assert M.rouge_l("a b. c d", "a c. b d") == pytest.approx(1.0, abs=1e-7)
    assert M.rouge_l("", "anything") == 0.0
    assert M.rouge_l("...", "a b") == 0.0  # only empty sentences
    assert M.rouge_l("x y", "a b") == 0.0
    assert M.rouge_l("Cat", "cat") == 0.0  # case-sensitive, as the package


def test_classification_retrieval_count_code():
    classes = ["City", "Individual", "Number of something", "Abbreviation", "Abbreviation expansion"]
    assert M.classification_score("Individual", "Individual", classes) == 1.0
    assert M.classification_score("City or Individual", "Individual", classes) == 0.5  # 2 classes named
    # "Abbreviation" is inside the reference "Abbreviation expansion": it does not count as a second class
    assert M.classification_score("Abbreviation expansion", "Abbreviation expansion", classes) == 1.0
    assert M.classification_score("Number of something", "Individual", classes) == 0.0
    # no class named: 0, however close (LongBench's similarity fallback never ran)
    assert M.classification_score("Individua", "Individual", classes) == 0.0
    assert M.retrieval_score("Paragraph 3, or maybe Paragraph 5", "Paragraph 3") == 0.5
    assert M.retrieval_score("no idea", "Paragraph 3") == 0.0
    assert M.count_score("There are 7 unique paragraphs, not 8", "7") == 0.5
    # first line without a code fence or comment: "x = foo(1)" vs "x = foo(2)": 2 * 9 / 20 = 0.9
    assert M.code_sim_score("```\n# comment\nx = foo(1)\n", "x = foo(2)") == pytest.approx(0.9)
    assert M.edit_similarity("abc", "abd") == pytest.approx(0.67)  # 2 * 2 / 6, whole percent


def test_ruler_string_match():
    assert M.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)
    assert M.string_match_all("ABC-def", ["abc-DEF"]) == 1.0  # case-insensitive
    assert M.string_match_part("it is 456", ["123", "456"]) == 1.0
    assert M.string_match_part("nothing", ["123", "456"]) == 0.0
    assert M.ruler_postprocess("  12\x0034 \n") == "12\n34"


def test_infinitebench_matches():
    assert M.first_int_match("The pass key is 40517.", "40517") == 1.0
    assert M.first_int_match("about 4051 7", "40517") == 0.0  # first digit run only
    assert M.kv_retrieval_match('The value is "0b0b-value".', "0b0b-value") == 1.0
    assert M.kv_retrieval_match("0b0b-values", "0b0b-value") == 0.0  # a whole word, not a substring
    label = ["At dawn", "B"]
    assert M.choice_match("B. At dawn", label) == 1.0
    assert M.choice_match("I think the answer is B", label) == 1.0
    assert M.choice_match("I think the answer is C", label) == 0.0
    assert M.choice_match("I would pick B here", label) == 1.0  # first standalone letter
    assert M.choice_match("", label) == 0.0
    assert M.choice_match(" B", label) == 1.0  # outputs start with a space: stripped first
    assert M.choice_match(" Paris", ["Paris", "B"]) == 1.0  # the option's text itself
    assert M.choice_match("Paris, France", ["Paris", "B"]) == 0.0
    assert M.choice_match(" At dawn", label) == 0.0  # as InfiniteBench: a first letter A-D decides first
    assert M.dialogue_match("It is probably Hamlet.", "HAMLET") == 1.0
    assert M.code_debug_match("B. func_b", ["func_b", "B"]) == 1.0
    assert M.code_debug_match("the answer is: func_b", ["func_b", "B"]) == 1.0
    assert M.code_debug_match("the answer is: func_c", ["func_b", "B"]) == 0.0
    assert M.code_debug_match(" B. func_b", ["func_b", "B"]) == 1.0  # after "The correct option is:"
    assert M.code_debug_match("So the correct option is: B", ["func_b", "B"]) == 1.0


# ------------------------------------------------------------------------------------------------
# Loaders


def test_longbench_loader_prompt_and_scores():
    samples = LB.load_benchmark("longbench", FIXTURES / "longbench" / "narrativeqa.jsonl")
    assert [s["id"] for s in samples] == ["narrativeqa/nq-001", "narrativeqa/nq-002"]
    s = samples[0]
    assert s["dataset"] == "narrativeqa" and s["max_new_tokens"] == 128
    assert s["raw_prompt"].startswith("You are given a story")
    assert "Story: Mara keeps the lighthouse" in s["raw_prompt"]
    assert s["raw_prompt"].endswith("Question: Who owns the lighthouse?\n\nAnswer:")
    # max over answers: "Tomas" vs ["Her uncle Tomas" (F1 = 2/3 after dropping nothing), "Tomas" (1)]
    assert LB.score_benchmark(s, "Tomas") == 1.0
    assert LB.score_benchmark(s, "her uncle") == pytest.approx(0.8)  # vs "her uncle tomas": P 1, R 2/3

    trec = LB.load_benchmark("longbench", FIXTURES / "longbench" / "trec.jsonl")[0]
    assert trec["all_classes"][1] == "Individual"
    assert LB.score_benchmark(trec, "Individual\nCity") == 1.0  # few-shot tasks score the first line only
    assert LB.score_benchmark(trec, "\nCity\nIndividual") == 0.0

    pr = LB.load_benchmark("longbench", FIXTURES / "longbench" / "passage_retrieval_en.jsonl")[0]
    assert LB.score_benchmark(pr, "Paragraph 2") == 1.0
    lcc = LB.load_benchmark("longbench", FIXTURES / "longbench" / "lcc.jsonl")[0]
    assert lcc["raw_prompt"] == ("Please complete the code given below. \ndef add(a, b):\n    total = a + b\n"
                                 "Next line of code:\n")
    assert LB.score_benchmark(lcc, "    return total\n") == 1.0


def test_lveval_loader_uses_first_answer_and_keywords():
    samples = LB.load_benchmark("lveval", FIXTURES / "lveval" / "hotpotwikiqa_mixup_16k.jsonl")
    s = samples[0]
    assert s["dataset"] == "hotpotwikiqa_mixup" and s["group"] == "hotpotwikiqa_mixup_16k"
    assert s["keywords"] == "Riga" and s["max_new_tokens"] == 64
    assert "Article: Passage 1" in s["raw_prompt"]
    # first answer only ("Riga, Latvia"): "Riga" -> P 1, R 1/2 -> 2/3 (the second answer "Riga" would give 1)
    assert LB.score_benchmark(s, "Riga") == pytest.approx(2 / 3)
    assert LB.score_benchmark(s, "Latvia") == 0.0  # keyword "Riga" missing: gated
    fr = LB.load_benchmark("lveval", FIXTURES / "lveval" / "factrecall_en_16k.jsonl")[0]
    assert fr["dataset"] == "factrecall_en" and fr["max_new_tokens"] == 16
    assert LB.score_benchmark(fr, "Ada Brook.") == 1.0


def test_infinitebench_loader():
    qa = LB.load_benchmark("infinitebench", FIXTURES / "infinitebench" / "longbook_qa_eng.jsonl")[0]
    assert qa["raw_prompt"].endswith("Question: Who captained the Aurora?\nAnswer:")
    assert LB.score_benchmark(qa, "Ines Varga") == 1.0
    choice = LB.load_benchmark("infinitebench", FIXTURES / "infinitebench" / "longbook_choice_eng.jsonl")[0]
    assert choice["answers"] == ["At dawn", "B"]  # [text, letter], as InfiniteBench scores choices
    assert "\nA. At noon\nB. At dawn\nC. At dusk\nD. At midnight" in choice["raw_prompt"]
    assert LB.score_benchmark(choice, "B") == 1.0 and LB.score_benchmark(choice, "A") == 0.0
    pk = LB.load_benchmark("infinitebench", FIXTURES / "infinitebench" / "passkey.jsonl")[0]
    assert pk["raw_prompt"].endswith("What is the pass key?\n\nThe pass key is") and pk["max_new_tokens"] == 6
    assert LB.score_benchmark(pk, " 40517. Remember") == 1.0
    kv = LB.load_benchmark("infinitebench", FIXTURES / "infinitebench" / "kv_retrieval.jsonl")[0]
    assert LB.score_benchmark(kv, '"0b0b-value"') == 1.0


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot tell which longbench subtask"):
        LB.load_benchmark("longbench", FIXTURES / "lveval" / "factrecall_en_16k.jsonl")
    bad = tmp_path / "narrativeqa.jsonl"
    bad.write_text('{"input": "q", "answers": ["a"]}\n')
    with pytest.raises(ValueError, match="row 1 does not follow the longbench format"):
        LB.load_benchmark("longbench", bad)
    with pytest.raises(FileNotFoundError, match="download"):
        LB.load_benchmark("longbench", tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"<benchmark>:<file\.jsonl>"):
        LB.parse_task("ruler:x.jsonl")
    assert LB.parse_task("LV-Eval:a/b.jsonl#factrecall_en") == ("lveval", Path("a/b.jsonl"), "factrecall_en")
    # an explicit subtask overrides the file name
    samples = LB.load_benchmark("longbench", FIXTURES / "lveval" / "factrecall_en_16k.jsonl", "multifieldqa_en")
    assert samples[0]["dataset"] == "multifieldqa_en"


def test_middle_truncation():
    tok = char_tokenizer()
    text = "abcdefghijklmnopqrstuvwxyz0123456789"  # 36 characters, 37 tokens with <s>
    # 20 tokens: the first 10 (<s> + 9 characters) and the last 10, decoded without <s>
    assert LB.truncate_middle(tok, text, 20) == "abcdefghi" + "0123456789"
    assert LB.truncate_middle(tok, text, 37) == text
    s = LB.load_benchmark("longbench", FIXTURES / "longbench" / "narrativeqa.jsonl")[:1]
    p = LB.prepare_prompts(s, tok, max_length=60)[0]
    assert len(tok(p["prompt"])["input_ids"]) <= 61  # re-tokenised (plus <s>)
    assert p["prompt"].startswith("You are given a story") and p["prompt"].endswith("\n\nAnswer:")
    assert "raw_prompt" not in p and p["add_special_tokens"] is True
