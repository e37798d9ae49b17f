"""Tiny offline fixtures for the evaluation tests: a character-level tokenizer and a random Llama."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHARS = string.printable  # digits, letters, punctuation, whitespace
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (so token positions are character positions), BOS prepended."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL + [c for c in CHARS if c not in SPECIAL])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    return fast


def tiny_llama(vocab_size: int = 128, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def save_tiny(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama and the character tokenizer in one folder (loadable with from_pretrained)."""
    tiny_llama(seed=seed).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
