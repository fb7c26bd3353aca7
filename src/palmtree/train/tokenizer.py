"""A word-level tokenizer built from the training captions and saved with the checkpoint."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

import torch

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: ``"A '7', drawn"`` -> ``a ' 7 ' , drawn``."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Maps captions to token ids; id 0 is padding, id 1 stands for unknown words.

    The vocabulary holds the training captions' words, most frequent first, up to
    ``max_size`` entries (specials included). Its state is plain lists and ints, so a
    checkpoint holding it loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, vocab: list[str], context_length: int) -> None:
        if vocab[:2] != [PAD, UNK]:
            raise ValueError(f"vocab must start with {PAD!r}, {UNK!r}")
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        self.vocab = list(vocab)
        self.context_length = int(context_length)
        self.index = {word: i for i, word in enumerate(self.vocab)}

    @classmethod
    def build(
        cls, captions: Iterable[str], context_length: int = 32, max_size: int = 10000
    ) -> WordTokenizer:
        counts = Counter(word for caption in captions for word in split_words(caption))
        words = sorted(counts, key=lambda w: (-counts[w], w))[: max(0, max_size - 2)]
        return cls([PAD, UNK, *words], context_length)

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, caption: str) -> list[int]:
        """Token ids, truncated to ``context_length``; empty only for a blank caption."""
        ids = [self.index.get(word, 1) for word in split_words(caption)]
        return ids[: self.context_length]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.vocab[i] for i in ids if i != 0)

    def batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [b, L] int64, mask [b, L] bool)``, padded to the longest caption."""
        return pad_batch([self.encode(c) for c in captions])

    def state_dict(self) -> dict:
        return {"vocab": list(self.vocab), "context_length": self.context_length}

    @classmethod
    def from_state_dict(cls, state: dict) -> WordTokenizer:
        return cls(list(state["vocab"]), int(state["context_length"]))


def pad_batch(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads id lists with 0; an empty list of sequences gives ``[0, 1]`` tensors."""
    length = max([len(s) for s in sequences], default=1)
    ids = torch.zeros(len(sequences), max(length, 1), dtype=torch.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.int64)
    return ids, ids != 0
