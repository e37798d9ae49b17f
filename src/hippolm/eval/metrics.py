"""Scoring rules of the long-context benchmarks, written to match their official evaluation code.

All functions take one prediction and one reference (or the list of references where the
benchmark defines it that way) and return a float in [0, 1]. Benchmarks report 100 x the mean.

- RULER: :func:`string_match_all` (needle tasks: fraction of expected values found in the
  output, case-insensitive) and :func:`string_match_part` (QA: any reference found).
- LongBench: :func:`qa_f1` (SQuAD-style token F1 after normalisation), :func:`rouge_l`
  (ROUGE-L F of the ``rouge`` PyPI package that LongBench calls), :func:`classification_score`,
  :func:`retrieval_score`, :func:`count_score`, :func:`code_sim_score`.
- LV-Eval: :func:`lveval_qa_f1` (token F1 gated by the recall of the answer keywords: below 0.2
  for English, 0.4 for Chinese, the score is 0) and :func:`lveval_rouge_zh_blacklist`.
- InfiniteBench: :func:`first_int_match`, :func:`kv_retrieval_match`, :func:`choice_match`,
  :func:`dialogue_match`, :func:`code_debug_match`, and :func:`qa_f1` for the book QA task.

Chinese tokenisation uses ``jieba`` when it is installed (as the official code does); without
it, Chinese text is split into characters, which gives slightly different F1 values.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Sequence

_PUNCT = set(string.punctuation)
_ZH_PUNCT = set(string.punctuation) | set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～"
    "｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
# LV-Eval's blacklists: words that do not count towards the keyword recall.
_BLACKLIST_EN_TEXT = ("and to of in her was with for it from is that his he by she they or at because be on are their "
                      "what as had were about being this who but have has when which does")
_BLACKLIST_ZH_TEXT = ("的 和 是 等 在 年 可以 为 与 ‰ 了 或 一种 月 c 至 日 有 进行 于 不 中 × 根据 小 由 亩 也 要 "
                      "指 法 会 元 主要 以及 通过 首先 对 然后 号 以 所 后 丁 包括 无 将 用 能 形 方面 因素 位于 而 "
                      "从 到 一定 用于 但 使用 让 具有 并 亿元 万元 上 类 基于 才 来 地 片 其他 个 或者 变得 时 给 "
                      "你 使 条 受 已经 带 度")
LVEVAL_BLACKLIST_EN = frozenset(_BLACKLIST_EN_TEXT.split())
LVEVAL_BLACKLIST_ZH = frozenset(_BLACKLIST_ZH_TEXT.split())


# ----------------------------------------------------------------------------------------------
# Normalisation and token F1


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD's rule)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, drop Chinese and ASCII punctuation and all whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _ZH_PUNCT and not ch.isspace())


def _zh_words(text: str) -> list[str]:
    try:
        import jieba  # optional, as in the official code

        words = list(jieba.cut(text, cut_all=False))
    except ImportError:  # one token per character
        words = list(text)
    return [w for w in (normalize_zh_answer(t) for t in words) if w]


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    """LongBench / InfiniteBench ``qa_f1_score``: token F1 after :func:`normalize_answer`."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str) -> float:
    """Chinese token F1 (jieba words, or characters without jieba)."""
    return token_f1(_zh_words(prediction), _zh_words(reference))


# ----------------------------------------------------------------------------------------------
# LV-Eval: keyword-gated F1


def lveval_qa_f1(prediction: str, reference: str, keywords: str | None = None) -> float:
    """LV-Eval's ``qa_f1_score_with_gold_ans``: 0 when fewer than 20% of the answer keywords
    (blacklisted words excluded from the hits) appear in the prediction, else :func:`qa_f1`."""
    pred = normalize_answer(prediction).split()
    if keywords:
        gold = normalize_answer(keywords).split()
        if gold:
            hits = sum(n for w, n in (Counter(pred) & Counter(gold)).items() if w not in LVEVAL_BLACKLIST_EN)
            if hits / len(gold) < 0.2:
                return 0.0
    return token_f1(pred, normalize_answer(reference).split())


def lveval_qa_f1_zh(prediction: str, reference: str, keywords: str | None = None) -> float:
    """Chinese variant: the gate is 40% and the keywords default to the reference."""
    pred, ref = _zh_words(prediction), _zh_words(reference)
    gold = _zh_words(keywords or reference)
    if gold:
        hits = sum(n for w, n in (Counter(pred) & Counter(gold)).items() if w not in LVEVAL_BLACKLIST_ZH)
        if hits / len(gold) < 0.4:
            return 0.0
    return token_f1(pred, ref)


def lveval_rouge_zh_blacklist(prediction: str, reference: str, keywords: str | None = None) -> float:
    """LV-Eval dureader: ROUGE-L over Chinese words with the blacklist removed."""
    pred = " ".join(w for w in _zh_words(prediction) if w not in LVEVAL_BLACKLIST_ZH)
    ref = " ".join(w for w in _zh_words(reference) if w not in LVEVAL_BLACKLIST_ZH)
    return rouge_l(pred, ref)


# ----------------------------------------------------------------------------------------------
# ROUGE-L


def _lcs_table(x: Sequence[str], y: Sequence[str]) -> list[list[int]]:
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, len(y) + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    return table


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> list[str]:
    """One longest common subsequence, backtracked with the ``rouge`` package's tie-breaking
    (move up only when strictly better), since it decides which words the union counts."""
    table = _lcs_table(x, y)
    i, j, out = len(x), len(y), []
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F as LongBench, LV-Eval and InfiniteBench compute it (``rouge`` 1.0.1,
    ``Rouge().get_scores(...)["rouge-l"]["f"]``, 0 on an empty side).

    Summary-level LCS: both texts are split into sentences at ".", words at single spaces
    (case-sensitive); the hits are the distinct words in the union of the per-sentence LCSs, and
    precision / recall divide by the distinct words of the prediction / reference.
    """
    hyp = [" ".join(s.split()) for s in prediction.split(".") if len(s) > 0]
    ref = [" ".join(s.split()) for s in reference.split(".") if len(s) > 0]
    if not hyp or not ref:
        return 0.0
    m = len({w for s in ref for w in s.split(" ")})
    n = len({w for s in hyp for w in s.split(" ")})
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            union.update(_lcs_words(r.split(" "), h.split(" ")))
    hits = len(union)
    if hits == 0:
        return 0.0
    p, r = hits / n, hits / m
    return 2.0 * p * r / (p + r + 1e-8)


def rouge_l_zh(prediction: str, reference: str) -> float:
    return rouge_l(" ".join(_zh_words(prediction)), " ".join(_zh_words(reference)))


# ----------------------------------------------------------------------------------------------
# LongBench: classification, retrieval, counting, code


def classification_score(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """LongBench (trec, lsht): 1/k when the reference is among the k class names found in the
    prediction (names that are substrings of the reference, other than itself, do not count); 0 when
    it names no class (LongBench's similarity fallback never ran: it sat behind a test of a list
    against 0, and the current metrics.py has none)."""
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if not (c in reference and c != reference)]
    return 1.0 / len(found) if reference in found else 0.0


def _id_fraction(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, reference: str) -> float:
    """LongBench passage_retrieval_en: fraction of the numbers in the output equal to the paragraph id."""
    ids = re.findall(r"Paragraph (\d+)", reference)
    return _id_fraction(prediction, ids[0]) if ids else 0.0


def retrieval_zh_score(prediction: str, reference: str) -> float:
    ids = re.findall(r"段落(\d+)", reference)
    return _id_fraction(prediction, ids[0]) if ids else 0.0


def count_score(prediction: str, reference: str) -> float:
    """LongBench passage_count: fraction of the numbers in the output equal to the count."""
    return _id_fraction(prediction, str(reference))


def edit_similarity(a: str, b: str) -> float:
    """Similarity in [0, 1] rounded to whole percent, as ``fuzzywuzzy.fuzz.ratio`` / 100 (difflib form)."""
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio()) / 100


def code_sim_score(prediction: str, reference: str) -> float:
    """LongBench lcc / repobench-p: edit similarity of the first output line that is not a
    comment or a code fence, against the reference line."""
    line = next((ln for ln in prediction.lstrip("\n").split("\n")
                 if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return edit_similarity(line, reference)


# ----------------------------------------------------------------------------------------------
# RULER string match


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER needle tasks: fraction of the references contained in the prediction (case-insensitive)."""
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references) if references else 0.0


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER QA tasks: 1 if any reference is contained in the prediction."""
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


def ruler_postprocess(prediction: str) -> str:
    """RULER strips the output and turns control characters into newlines before matching."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


# ----------------------------------------------------------------------------------------------
# InfiniteBench


def first_int_match(prediction: str, reference: str) -> float:
    """InfiniteBench passkey / number_string: the first run of digits equals the answer."""
    match = re.search(r"\d+", prediction)
    return float(match is not None and match.group(0) == str(reference))


def _words(prediction: str, chars: str = "\n:\"'.,?!{}") -> list[str]:
    for c in chars:
        prediction = prediction.replace(c, " ")
    return prediction.split()


def kv_retrieval_match(prediction: str, reference: str) -> float:
    """InfiniteBench kv_retrieval: the value appears as a word of the output."""
    return float(reference in _words(prediction))


def dialogue_match(prediction: str, reference: str) -> float:
    """InfiniteBench longdialogue_qa_eng: the (upper-case) name appears as a word of the output."""
    return float(reference in [w.upper() for w in _words(prediction)])


def choice_match(prediction: str, references: Sequence[str]) -> float:
    """InfiniteBench longbook_choice_eng, as its compute_scores.py: the stripped output's first
    character if it is A-D, else the output being one of the references (an option's text), else
    the text after an answer prefix, else the first word that is a substring of "ABCD"."""
    pred = prediction.strip()
    if not pred:
        return 0.0
    if pred[0] in "ABCD":
        return float(pred[0] in references)
    if pred in references:
        return 1.0
    text = " ".join(_words(pred, "\n\"'.,?!{}"))
    for prefix in ("answer is:", "answer:", "answer is", "option is"):
        idx = text.find(prefix)
        if idx != -1:
            after = text[idx + len(prefix) + 1:]
            return float(any(after.startswith(r) for r in references))
    for word in text.split():
        if word in "ABCD":
            return float(word in references)
    return 0.0


def code_debug_match(prediction: str, reference: Sequence[str]) -> float:
    """InfiniteBench code_debug, as its compute_scores.py: the stripped output starts with the letter
    and a period or colon, or the letter or function name follows an answer prefix. ``reference`` =
    [name, letter]."""
    name, letter = reference[0], reference[1]
    text = prediction.strip()  # outputs usually start with a space ("The correct option is: A.")
    if text[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    for c in ("\n", "`", "'", '"', "-", "*", "Option", "option"):
        text = text.replace(c, " ")
    while "  " in text:
        text = text.replace("  ", " ")
    for prefix in ("answer is:", "is:", "answer:", "correct option is:"):
        idx = text.find(prefix)
        if idx != -1:
            after = text[idx + len(prefix) + 1:]
            return float(after.startswith(letter) or after.startswith(name))
    return 0.0


def best_of(metric, prediction: str, references: Sequence[str], **kwargs) -> float:
    """Max of ``metric`` over the references (LongBench's rule for lists of answers)."""
    return max((metric(prediction, r, **kwargs) for r in references), default=0.0)
