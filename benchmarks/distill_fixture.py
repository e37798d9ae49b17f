"""Make a small random Llama base, its word-level tokenizer and a text corpus, offline.

Used by ``benchmarks/distill_2gpu.sh`` to exercise ``hippolm distill`` on machines with no hub
access. The weights are initialised with a larger spread than usual so attention is sharp and the
context beyond the sliding window changes the teacher's predictions (there is something to learn).

    python benchmarks/distill_fixture.py OUT_DIR [--hidden 256 --layers 4 --docs 64 --doc-words 3000]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--words", type=int, default=500)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--doc-words", type=int, default=3000)
    p.add_argument("--init", type=float, default=0.1)
    a = p.parse_args()
    out = Path(a.out)
    words = [f"w{i}" for i in range(a.words)]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>", "</s>",
                                                                                          "<pad>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                   pad_token="<pad>")
    fast.save_pretrained(out / "base")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=a.hidden, intermediate_size=a.hidden * 3,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads // 2,
                      max_position_embeddings=65536, initializer_range=a.init, bos_token_id=1, eos_token_id=2,
                      pad_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(out / "base")
    rng = random.Random(0)
    (out / "data").mkdir(parents=True, exist_ok=True)
    with open(out / "data" / "corpus.jsonl", "w") as f:
        for _ in range(a.docs):
            # Zipf-like word frequencies and repeated phrases: text with long-range structure.
            phrases = [" ".join(rng.choices(words, k=8)) for _ in range(20)]
            doc = [rng.choice(phrases) if rng.random() < 0.3 else words[min(int(rng.paretovariate(1.2)), a.words - 1)]
                   for _ in range(a.doc_words // 2)]
            f.write(json.dumps({"text": " ".join(doc)}) + "\n")
    print(out / "base", out / "data")


if __name__ == "__main__":
    main()
