"""A small byte-level BPE tokenizer for synthetic checkpoints (Qwen-style special tokens).

Byte-level BPE round-trips any text, so prompts and generated ids decode cleanly. It is trained
deterministically on the bundled corpus; its vocabulary never exceeds the model's.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MAX_VOCAB = 4096


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with at most ``min(vocab_size, 4096)`` entries."""
    size = min(vocab_size, MAX_VOCAB)
    if size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = resources.files("pipeline").joinpath("data/corpus.txt").read_text().splitlines()
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def write_tokenizer(out: Path, vocab_size: int) -> dict[str, int]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json``; return the special token ids."""
    tok = build_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 262144,
            },
            indent=2,
        )
        + "\n"
    )
    return ids
