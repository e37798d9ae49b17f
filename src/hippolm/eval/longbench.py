"""LongBench, LV-Eval and InfiniteBench from their published JSONL files (downloaded by the user).

File formats (one JSON object a line, as each benchmark publishes them):

- LongBench (``THUDM/LongBench``, ``<dataset>.jsonl``, LongBench-E ``<dataset>_e.jsonl``):
  ``input``, ``context``, ``answers`` (list), ``length``, ``dataset``, ``language``,
  ``all_classes`` (classification tasks), ``_id``.
- LV-Eval (``Infinigence/LVEval``, ``<dataset>_<16k|32k|64k|128k|256k>.jsonl``): ``input``,
  ``context``, ``answers`` (list; the first is scored), ``length``, ``dataset``, ``language``,
  ``answer_keywords`` (gates the F1), ``confusing_facts``.
- InfiniteBench (``xinrongzhang2022/InfiniteBench``, ``<task>.jsonl``): ``id``, ``context``,
  ``input``, ``answer`` (list or str), ``options`` (choice tasks).

Prompts, generation lengths and metrics are the benchmarks' own (LongBench's
``dataset2prompt``/``dataset2maxlen``, LV-Eval's ``config.py``, InfiniteBench's open-model
templates); the subtask comes from the rows' ``dataset`` field or the file name. Prompts longer
than ``max_length`` tokens are cut in the middle (first and last ``max_length // 2`` tokens,
decoded and joined), LongBench's rule, which LV-Eval and InfiniteBench follow; the chat template
(optional) is applied after truncation, and LongBench's few-shot and code tasks never get it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import metrics as M

BENCHMARKS = ("longbench", "lveval", "infinitebench")


@dataclass(frozen=True)
class Subtask:
    prompt: str
    max_new_tokens: int
    metric: str
    chat: bool = True  # whether a chat template may wrap the prompt
    first_line: bool = False  # score only the first line of the output (LongBench few-shot tasks)


_QA_PASSAGES = ("Answer the question based on the given passages. Only give me the answer and do not output any other "
                "words.\n\nThe following are given passages.\n{context}\n\nAnswer the question based on the given "
                "passages. Only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:")

LONGBENCH: dict[str, Subtask] = {
    "narrativeqa": Subtask(
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "as concisely as you can, using a single phrase if possible. Do not provide any explanation.\n\nStory: "
        "{context}\n\nNow, answer the question based on the story as concisely as you can, using a single phrase "
        "if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128, "qa_f1"),
    "qasper": Subtask(
        "You are given a scientific article and a question. Answer the question as concisely as you can, using a "
        "single phrase or sentence if possible. If the question cannot be answered based on the information in the "
        "article, write \"unanswerable\". If the question is a yes/no question, answer \"yes\", \"no\", or "
        "\"unanswerable\". Do not provide any explanation.\n\nArticle: {context}\n\n Answer the question based on "
        "the above article as concisely as you can, using a single phrase or sentence if possible. If the question "
        "cannot be answered based on the information in the article, write \"unanswerable\". If the question is a "
        "yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any explanation.\n\n"
        "Question: {input}\n\nAnswer:", 128, "qa_f1"),
    "multifieldqa_en": Subtask(
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64, "qa_f1"),
    "hotpotqa": Subtask(_QA_PASSAGES, 32, "qa_f1"),
    "2wikimqa": Subtask(_QA_PASSAGES, 32, "qa_f1"),
    "musique": Subtask(_QA_PASSAGES, 32, "qa_f1"),
    "gov_report": Subtask(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:", 512, "rouge_l"),
    "qmsum": Subtask(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:", 512, "rouge_l"),
    "multi_news": Subtask(
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:", 512, "rouge_l"),
    "trec": Subtask("Please determine the type of the question below. Here are some examples of questions.\n\n"
                    "{context}\n{input}", 64, "classification", chat=False, first_line=True),
    "triviaqa": Subtask("Answer the question based on the given passage. Only give me the answer and do not output "
                        "any other words. The following are some examples.\n\n{context}\n\n{input}", 32, "qa_f1",
                        chat=False, first_line=True),
    "samsum": Subtask("Summarize the dialogue into a few short sentences. The following are some examples.\n\n"
                      "{context}\n\n{input}", 128, "rouge_l", chat=False, first_line=True),
    "passage_count": Subtask(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ", 32, "count"),
    "passage_retrieval_en": Subtask(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        "the paragraph that the abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", "
        "etc.\n\nThe answer is: ", 32, "retrieval"),
    "lcc": Subtask("Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim",
                   chat=False),
    "repobench-p": Subtask("Please complete the code given below. \n{context}{input}Next line of code:\n", 64,
                           "code_sim", chat=False),
}

_LV_EN = ("Please answer the following question based on the given passages. Questions and answers are only relevant "
          "to one passage. Only give me the answer and do not output any other explanation and evidence.\n\n"
          "Article: {context}\n\nPlease answer the following question based on the above passages. Questions and "
          "answers are only relevant to one passage. Only give me the answer and do not output any other explanation "
          "and evidence.\n\nQuestion: {input}\nAnswer:")
_LV_ZH = ("请根据下面给定的文章回答问题，问题和答案只与其中一篇文章有关。\n\n文章：{context}\n\n"
          "现在请基于上述文章回答下面的问题，问题和答案只与其中一篇文章有关。\n\n问题：{input}\n回答：")
LVEVAL: dict[str, Subtask] = {
    "hotpotwikiqa_mixup": Subtask(
        "Answer the question based on the given passages. Questions and answers are only relevant to some passages. "
        "Only give me the answer and do not output any other explanation and evidence.\n\nArticle: {context}\n\n"
        "Please answer the following question based on the above passages. Questions and answers are only relevant "
        "to some passages. Only give me the answer and do not output any other explanation and evidence.\n\n"
        "Question: {input}\nAnswer:", 64, "lveval_f1"),
    "loogle_SD_mixup": Subtask(_LV_EN, 64, "lveval_f1"),
    "loogle_CR_mixup": Subtask(_LV_EN, 64, "lveval_f1"),
    "loogle_MIR_mixup": Subtask(_LV_EN, 64, "lveval_f1"),
    "multifieldqa_en_mixup": Subtask(_LV_EN, 64, "lveval_f1"),
    "multifieldqa_zh_mixup": Subtask(
        "请阅读以下文章并用中文回答问题，问题和答案只与其中一篇文章有关。只需要直接给出问题的答案，不要输出其他任何解释和证据。\n\n文章：{context}\n\n"
        "请基于上面的文章回答下面的问题，问题和答案只与其中一篇文章有关。只需要直接给出问题的答案，不要输出其他任何解释和证据。\n\n问题：{input}\n回答：",
        64, "lveval_f1_zh"),
    "factrecall_en": Subtask("Please answer the following questions based on the given article.\n\nArticle: "
                             "{context}\n\nPlease answer the following questions based on the above article.\n\n"
                             "Question: {input}\nAnswer:", 16, "qa_f1"),
    "factrecall_zh": Subtask("请基于给定的文章回答下述问题。\n\n文章：{context}\n\n"
                             "现在请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：", 16, "qa_f1_zh"),
    "cmrc_mixup": Subtask(_LV_ZH, 64, "lveval_f1_zh"),
    "lic_mixup": Subtask(_LV_ZH.replace("现在请基于", "请现在基于"), 64, "lveval_f1_zh"),
    "dureader_mixup": Subtask(_LV_ZH, 64, "lveval_rouge_zh"),
}

_OPTIONS = "\nA. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}"
INFINITEBENCH: dict[str, Subtask] = {
    "passkey": Subtask("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                       "I will quiz you about the important information there.\n\n{context}\n\n{input}\n\n"
                       "The pass key is", 6, "first_int"),
    "number_string": Subtask("There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz "
                             "you about the important information there.\n\n{context}\n\n{input}\n\n"
                             "The sequence of digits is", 12, "first_int"),
    "kv_retrieval": Subtask("Extract the value corresponding to the specified key in the JSON object below.\n\n"
                            "{context}\n\n{input}", 50, "kv_retrieval"),
    "longbook_qa_eng": Subtask("Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\n"
                               "Question: {question}\nAnswer:", 40, "qa_f1"),
    "longbook_qa_chn": Subtask("阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：", 40,
                               "qa_f1_zh_chars"),
    "longbook_choice_eng": Subtask("Read the book and answer the question.\n\n{context}\n\nQuestion: {question}"
                                   + _OPTIONS + "\n\nThe letter of the correct answer is", 40, "choice"),
    # InfiniteBench scores this with HF evaluate's rougeLsum; ours is the rouge-package ROUGE-L (close, not equal).
    "longbook_sum_eng": Subtask("Summarize the book below.\n\n{context}\n\nSummary:", 1200, "rouge_l"),
    "longdialogue_qa_eng": Subtask("Below is a dialogue script where one random occurrence of a character name is "
                                   "replaced with \"$$MASK$$\", and you should try to guess who that character is.\n\n"
                                   "{context}\n\nThe name that has been replaced with $$MASK$$ is likely", 40,
                                   "dialogue"),
    "code_debug": Subtask("Following is a Python code where exactly one of the functions/methods has a deliberate "
                          "error that makes it crash.\n\n{context}\n\nOptions:" + _OPTIONS + "\n\nThe correct option "
                          "is:", 5, "code_debug"),
}

TABLES = {"longbench": LONGBENCH, "lveval": LVEVAL, "infinitebench": INFINITEBENCH}


def _qa_f1_zh_chars(prediction: str, reference: str) -> float:
    """InfiniteBench's Chinese F1: one character one token."""
    return M.token_f1(list(M.normalize_zh_answer(prediction)), list(M.normalize_zh_answer(reference)))


# metric name -> fn(prediction, sample) -> float
METRICS: dict[str, Callable[[str, dict], float]] = {
    "qa_f1": lambda p, s: M.best_of(M.qa_f1, p, s["answers"]),
    "qa_f1_zh": lambda p, s: M.best_of(M.qa_f1_zh, p, s["answers"]),
    "qa_f1_zh_chars": lambda p, s: M.best_of(_qa_f1_zh_chars, p, s["answers"]),
    "rouge_l": lambda p, s: M.best_of(M.rouge_l, p, s["answers"]),
    "classification": lambda p, s: M.best_of(M.classification_score, p, s["answers"],
                                             all_classes=s.get("all_classes") or []),
    "retrieval": lambda p, s: M.best_of(M.retrieval_score, p, s["answers"]),
    "count": lambda p, s: M.best_of(M.count_score, p, s["answers"]),
    "code_sim": lambda p, s: M.best_of(M.code_sim_score, p, s["answers"]),
    # LV-Eval scores the first answer only
    "lveval_f1": lambda p, s: M.lveval_qa_f1(p, s["answers"][0], s.get("keywords")),
    "lveval_f1_zh": lambda p, s: M.lveval_qa_f1_zh(p, s["answers"][0], s.get("keywords")),
    "lveval_rouge_zh": lambda p, s: M.lveval_rouge_zh_blacklist(p, s["answers"][0]),
    "first_int": lambda p, s: M.first_int_match(p, s["answers"][0]),
    "kv_retrieval": lambda p, s: M.kv_retrieval_match(p, s["answers"][0]),
    "dialogue": lambda p, s: M.dialogue_match(p, s["answers"][0]),
    "choice": lambda p, s: M.choice_match(p, s["answers"]),
    "code_debug": lambda p, s: M.code_debug_match(p, s["answers"]),
}


def parse_task(spec: str) -> tuple[str, Path, str | None]:
    """``longbench:<file>[#subtask]`` -> (benchmark, path, subtask or None)."""
    bench, _, rest = spec.partition(":")
    bench = bench.lower().replace("-", "").replace("_", "")
    if bench not in BENCHMARKS or not rest:
        raise ValueError(f"benchmark tasks are written <benchmark>:<file.jsonl>[#subtask] with benchmark one of "
                         f"{', '.join(BENCHMARKS)}; got {spec!r}.")
    path, _, sub = rest.partition("#")
    return bench, Path(path), sub or None


def _subtask_name(benchmark: str, name: str) -> str | None:
    table = TABLES[benchmark]
    candidates = [name, re.split(r"_.{1,3}k$", name)[0], re.sub(r"_e$", "", name)]
    return next((c for c in candidates if c in table), None)


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: download the benchmark's JSONL files and pass one of them.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text)
        return rows if isinstance(rows, list) else [rows]
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not a JSON object ({e.msg}).") from None
    return rows


def _answers(row: dict, key: str) -> list[str]:
    value = row.get(key)
    if value is None:
        raise ValueError(f"row has no {key!r} field")
    return [value] if isinstance(value, str | int | float) else list(value)


def load_benchmark(benchmark: str, path: str | Path, subtask: str | None = None, limit: int | None = None
                   ) -> list[dict]:
    """Samples of one benchmark file: dicts with ``id``, ``benchmark``, ``dataset`` (the subtask),
    ``group`` (the file name without extension: LV-Eval's carries the length level), ``raw_prompt``
    (the official prompt, untruncated), ``answers``, ``max_new_tokens``, ``length``, and where the
    benchmark has them ``all_classes`` / ``keywords``."""
    if benchmark not in TABLES:
        raise ValueError(f"benchmark must be one of {', '.join(BENCHMARKS)}, got {benchmark!r}.")
    path = Path(path)
    rows = _read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    table = TABLES[benchmark]
    out = []
    for i, row in enumerate(rows):
        name = subtask or _subtask_name(benchmark, str(row.get("dataset", ""))) or _subtask_name(benchmark, path.stem)
        if name is None or name not in table:
            raise ValueError(f"{path}: cannot tell which {benchmark} subtask this is (file name {path.stem!r}, "
                             f"dataset field {row.get('dataset')!r}); supported: {', '.join(table)}. "
                             f"Name it explicitly: {benchmark}:{path}#<subtask>.")
        spec = table[name]
        try:
            sample = _sample(benchmark, name, spec, row)
        except (KeyError, ValueError, IndexError) as e:
            raise ValueError(f"{path}: row {i + 1} does not follow the {benchmark} format ({e}).") from None
        rid = row.get("_id", row.get("id", i))
        sample.update(id=f"{path.stem}/{rid}", benchmark=benchmark, dataset=name, group=path.stem,
                      max_new_tokens=spec.max_new_tokens)
        out.append(sample)
    return out


def _sample(benchmark: str, name: str, spec: Subtask, row: dict) -> dict:
    if benchmark == "infinitebench":
        options = row.get("options") or []
        fields = {"context": row["context"], "input": row.get("input", ""), "question": row.get("input", "")}
        if "OPTION_A" in spec.prompt:
            if len(options) < 4:
                raise ValueError("choice task without 4 options")
            fields.update(OPTION_A=options[0], OPTION_B=options[1], OPTION_C=options[2], OPTION_D=options[3])
        answers = _answers(row, "answer")
        if name in ("longbook_choice_eng", "code_debug") and not (len(answers) == 2 and answers[1] in "ABCD"):
            answers = [answers[0], "ABCD"[options.index(answers[0])]]  # [text, letter], as InfiniteBench scores
        answers = [str(a) for a in answers]
        return {"raw_prompt": spec.prompt.format(**fields), "answers": answers, "length": row.get("length")}
    answers = [str(a) for a in _answers(row, "answers")]
    if not answers:
        raise ValueError("empty answers")
    sample = {"raw_prompt": spec.prompt.format(context=row["context"], input=row.get("input", "")),
              "answers": answers, "length": row.get("length")}
    if row.get("all_classes"):
        sample["all_classes"] = list(row["all_classes"])
    if benchmark == "lveval":
        sample["keywords"] = row.get("answer_keywords")
    return sample


def truncate_middle(tokenizer, text: str, max_length: int) -> str:
    """LongBench's rule: a prompt over ``max_length`` tokens keeps its first and last
    ``max_length // 2`` tokens (decoded, special tokens skipped, and joined)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) <= max_length:
        return text
    half = max_length // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[-half:], skip_special_tokens=True))


def prepare_prompts(samples: list[dict], tokenizer, max_length: int | None = None, chat: bool = False
                    ) -> list[dict]:
    """Add ``prompt`` (truncated in the middle to ``max_length`` tokens, then wrapped in the chat
    template where allowed) and ``add_special_tokens`` to each sample."""
    out = []
    for s in samples:
        text = s["raw_prompt"] if max_length is None else truncate_middle(tokenizer, s["raw_prompt"], max_length)
        wrap = chat and TABLES[s["benchmark"]][s["dataset"]].chat
        if wrap:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        out.append({**{k: v for k, v in s.items() if k != "raw_prompt"}, "prompt": text,
                    "add_special_tokens": not wrap})
    return out


def score_benchmark(sample: dict, prediction: str) -> float:
    """The benchmark's score of one prediction, in [0, 1]."""
    spec = TABLES[sample["benchmark"]][sample["dataset"]]
    if spec.first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return float(METRICS[spec.metric](prediction, sample))
