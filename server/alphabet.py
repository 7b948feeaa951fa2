"""Words -> letter indices -> padded one-hot batch, vectorised over a whole request (no per-character loops)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.errors import InvalidWordError


@dataclass(frozen=True, slots=True)
class EncodedWords:
    """Letter indices of several words, concatenated, with each word's length."""

    indices: npt.NDArray[np.int64]  # [total characters]
    lengths: npt.NDArray[np.int32]  # [words]


class Alphabet:
    """Maps characters to one-hot positions: alphabet[i] is input i."""

    def __init__(self, letters: str) -> None:
        self.letters = letters
        codes = np.frombuffer(letters.encode("utf-32-le"), dtype=np.uint32)
        order = np.argsort(codes, kind="stable")
        self._sorted_codes = codes[order]
        self._positions = order.astype(np.int64)

    def __len__(self) -> int:
        return len(self.letters)

    def check(self, words: Sequence[str], max_length: int) -> list[InvalidWordError | None]:
        """For each word, None if it can be encoded, else the error naming what is wrong."""
        lengths = np.fromiter((len(word) for word in words), dtype=np.int64, count=len(words))
        bad_chars = self._bad_char_mask(words)
        problems: list[InvalidWordError | None] = [None] * len(words)
        # Only the few bad words are visited in Python.
        for index in np.flatnonzero((lengths == 0) | (lengths > max_length)):
            problems[index] = self._describe(int(index), words[index], max_length)
        if bad_chars.any():
            offsets = np.concatenate(([0], np.cumsum(lengths)))
            for index in np.unique(np.searchsorted(offsets, np.flatnonzero(bad_chars), side="right") - 1):
                if problems[index] is None:
                    problems[index] = self._describe(int(index), words[index], max_length)
        return problems

    def encode(self, words: Sequence[str]) -> EncodedWords:
        """Indices of words already known to be valid (see check)."""
        codes = np.frombuffer("".join(words).encode("utf-32-le"), dtype=np.uint32)
        slots = np.searchsorted(self._sorted_codes, codes)
        lengths = np.fromiter((len(word) for word in words), dtype=np.int32, count=len(words))
        return EncodedWords(self._positions[slots], lengths)

    def _bad_char_mask(self, words: Sequence[str]) -> npt.NDArray[np.bool_]:
        codes = np.frombuffer("".join(words).encode("utf-32-le"), dtype=np.uint32)
        slots = np.minimum(np.searchsorted(self._sorted_codes, codes), len(self._sorted_codes) - 1)
        return self._sorted_codes[slots] != codes

    def _describe(self, index: int, word: str, max_length: int) -> InvalidWordError:
        if not word:
            return InvalidWordError(index, word, "the word is empty")
        if len(word) > max_length:
            return InvalidWordError(index, word, f"the word has {len(word)} characters, more than the limit of {max_length}")
        for position, char in enumerate(word):
            if char not in self.letters:
                return InvalidWordError(
                    index, word, f"character {char!r} at position {position} is not in the model's alphabet {self.letters!r}"
                )
        raise AssertionError(f"word {index} was reported invalid but is valid")


def one_hot_batch(encoded: EncodedWords, alphabet_size: int) -> npt.NDArray[np.float32]:
    """Padded one-hot batch [words, max_len, alphabet_size]; positions past a word's end are zero rows."""
    lengths = encoded.lengths
    batch = np.zeros((len(lengths), int(lengths.max()), alphabet_size), dtype=np.float32)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    columns = np.arange(len(encoded.indices)) - starts
    batch[rows, columns, encoded.indices] = 1.0
    return batch
