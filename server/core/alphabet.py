"""Words -> letter indices -> padded one-hot batch, vectorised over a whole request (no per-character loops).

Hot path (every request): check() first tries a set-inclusion test over the whole request, which runs in C
and settles the common all-valid case; only requests with a bad word take the vectorised search that names
each bad word. encode() maps characters to indices through a byte translation table when every letter is
below U+0100, else through a small lookup table (or a sorted search for very high code points).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from server.core.errors import InvalidWordError, Reason


@dataclass(frozen=True, slots=True)
class WordIndices:
    """Letter indices of several words, concatenated, with each word's length."""

    indices: npt.NDArray[np.int64]  # [total characters]
    lengths: npt.NDArray[np.int32]  # [words]
    longest: int
    """lengths.max(), kept: the batch key, the one-hot batch and each request's slice of a run all need it."""


class Alphabet:
    """Maps characters to one-hot positions: alphabet[i] is input i."""

    def __init__(self, letters: str) -> None:
        self.letters = letters
        codes = np.frombuffer(letters.encode("utf-32-le"), dtype=np.uint32)
        order = np.argsort(codes, kind="stable")
        self._sorted_codes = codes[order]
        self._positions = order.astype(np.int64)
        self._letter_set = frozenset(letters)
        top = int(codes.max()) if len(codes) else 0
        # Letters all below U+0100: latin-1 bytes translated straight to indices (one C pass, no numpy).
        self._byte_table: bytes | None = None
        if top < 256 and len(letters) <= 256:
            table = bytearray(256)
            for position, char in enumerate(letters):
                table[ord(char)] = position
            self._byte_table = bytes(table)
        # Otherwise a direct lookup table over code points when it stays small (at most 256 KiB).
        self._code_table: npt.NDArray[np.int64] | None = None
        if self._byte_table is None and top < 32768:
            self._code_table = np.zeros(top + 1, dtype=np.int64)
            self._code_table[codes] = np.arange(len(codes), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.letters)

    def check(self, words: Sequence[str], max_length: int) -> list[InvalidWordError | None]:
        """For each word, None if it can be encoded, else the error naming what is wrong."""
        if words:
            shortest, longest = min(map(len, words)), max(map(len, words))
            if shortest > 0 and longest <= max_length and self._letter_set.issuperset("".join(words)):
                return [None] * len(words)  # the common case, settled in C
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

    def indices(self, words: Sequence[str]) -> WordIndices:
        """Indices of words already known to be valid (see check)."""
        joined = "".join(words)
        lengths = np.fromiter(map(len, words), dtype=np.int32, count=len(words))
        # Python's max, not lengths.max(): a numpy reduction costs 5-7 us on a cold request, this under 1.
        longest = max(map(len, words), default=0)
        if self._byte_table is not None:
            indices = np.frombuffer(joined.encode("latin-1").translate(self._byte_table), dtype=np.uint8)
            return WordIndices(indices.astype(np.int64), lengths, longest)
        codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
        if self._code_table is not None:
            return WordIndices(self._code_table[codes], lengths, longest)
        slots = np.searchsorted(self._sorted_codes, codes)
        return WordIndices(self._positions[slots], lengths, longest)

    def _bad_char_mask(self, words: Sequence[str]) -> npt.NDArray[np.bool_]:
        codes = np.frombuffer("".join(words).encode("utf-32-le"), dtype=np.uint32)
        slots = np.minimum(np.searchsorted(self._sorted_codes, codes), len(self._sorted_codes) - 1)
        return self._sorted_codes[slots] != codes

    def _describe(self, index: int, word: str, max_length: int) -> InvalidWordError:
        if not word:
            return InvalidWordError(index, word, "the word is empty", Reason.WORD_EMPTY)
        if len(word) > max_length:
            return InvalidWordError(
                index, word, f"the word has {len(word)} characters, more than the limit of {max_length}",
                Reason.WORD_TOO_LONG,
            )
        for position, char in enumerate(word):
            if char not in self._letter_set:
                return InvalidWordError(
                    index, word,
                    f"character {char!r} at position {position} is not in the model's alphabet {self.letters!r}",
                    Reason.WORD_NOT_IN_ALPHABET, position,
                )
        raise AssertionError(f"word {index} was reported invalid but is valid")


@functools.lru_cache(maxsize=64)
def _identity(size: int) -> npt.NDArray[np.float32]:
    return np.eye(size, dtype=np.float32)


def one_hot_batch(letters: WordIndices, alphabet_size: int) -> npt.NDArray[np.float32]:
    """Padded one-hot batch [words, max_len, alphabet_size]; positions past a word's end are zero rows."""
    lengths = letters.lengths
    words, max_len = len(lengths), letters.longest
    rows = np.take(_identity(alphabet_size), letters.indices, axis=0)  # [total characters, alphabet_size]
    if len(letters.indices) == words * max_len:  # every word as long as the longest: no padding
        return rows.reshape(words, max_len, alphabet_size)
    batch = np.zeros((words, max_len, alphabet_size), dtype=np.float32)
    batch[np.arange(max_len) < lengths[:, None]] = rows  # row-major order of the mask = word order
    return batch
