"""GloVe word vectors for a vocabulary, read from a local text file (or the .zip it is distributed in).

A GloVe file has one `word v1 ... vD` line per word; the real ones are 1-5 GB (glove.6B.300d: 400k
words, glove.42B/840B.300d: 1.9M/2.2M), so the file is streamed line by line and only the rows of
vocabulary words are parsed and kept. Nothing is ever downloaded.

Words GloVe lacks get random vectors drawn from N(0, 0.09²), as VAL's `read_glove.py` does
(`np.random.normal(0, 0.09, dim)`; <UNK> also gets a random row there, since '<UNK>' is not a GloVe
word). Here the draws come from a seeded generator so the output is reproducible. (AMC instead leaves
missing rows at nn.Embedding's N(0, 1) initialisation and retries a missing word with '-', '.', "'"
removed; pass `oov_std=1.0` to get its scale.)
"""
from __future__ import annotations

import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

VAL_OOV_STD = 0.09


def _is_float(text: bytes) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def zip_member(archive: Path | str, dim: int, member: str | None = None) -> str:
    """The .txt member of a GloVe zip to read: `member` if given, else the only .txt, else the one named `*.{dim}d.txt`."""
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    if member is not None:
        if member not in names:
            raise ValueError(f"{archive}: no member {member!r} (have {names})")
        return member
    texts = [n for n in names if n.endswith(".txt")]
    if len(texts) == 1:
        return texts[0]
    matching = [n for n in texts if Path(n).name.endswith(f".{dim}d.txt")]
    if len(matching) == 1:
        return matching[0]
    raise ValueError(f"{archive}: cannot tell which member holds the {dim}-d vectors (have {texts}); name one")


@contextmanager
def open_glove(path: Path | str, dim: int, member: str | None = None) -> Iterator[tuple[BinaryIO, str]]:
    """(binary line stream, name for messages) of a GloVe .txt, or of a member of a .zip."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GloVe file")
    if zipfile.is_zipfile(path):
        name = zip_member(path, dim, member)
        with zipfile.ZipFile(path) as zf, zf.open(name) as stream:
            yield stream, f"{path}:{name}"
    else:
        with open(path, "rb") as stream:
            yield stream, str(path)


def read_glove(
    path: Path | str,
    words: Sequence[str],
    dim: int,
    member: str | None = None,
    reserved: int = 0,
    oov_std: float = VAL_OOV_STD,
    seed: int = 0,
) -> tuple[np.ndarray, set[str]]:
    """(float32 matrix len(words) x dim, the words found in the file).

    Row i is GloVe's vector of words[i], or a N(0, oov_std²) draw when the file lacks it. The first
    `reserved` rows (e.g. 1 for <UNK>) are never looked up: they are always random draws. A line
    whose vector does not have `dim` values raises ValueError naming the file and line number, so a
    file of another dimension fails on its first line. Lines whose word holds spaces (a handful in
    glove.840B) are skipped: no vocabulary word contains a space. The first occurrence of a word
    wins. Reading stops once every word is found.
    """
    matrix = np.random.default_rng(seed).normal(0.0, oov_std, (len(words), dim)).astype(np.float32)
    rows_of: dict[str, list[int]] = {}
    for row, word in enumerate(words[reserved:], start=reserved):
        rows_of.setdefault(word, []).append(row)
    found: set[str] = set()
    with open_glove(path, dim, member) as (stream, name):
        for number, raw in enumerate(stream, start=1):
            if len(found) == len(rows_of):
                break
            line = raw.rstrip()
            if not line:
                continue
            word_bytes, _, rest = line.partition(b" ")
            if rest.count(b" ") + 1 != dim:
                parts = line.split(b" ")
                extra = parts[1: len(parts) - dim]
                if len(parts) > dim + 1 and not all(_is_float(p) for p in extra):
                    continue  # a word with spaces in it
                raise ValueError(f"{name}: line {number}: {len(parts) - 1} values, expected {dim} "
                                 f"(is vocabulary.glove_dim right for this file?)")
            word = word_bytes.decode("utf-8", errors="replace")
            if word not in rows_of or word in found:
                continue
            try:
                vector = np.array(rest.split(b" "), dtype=np.float32)
            except ValueError:
                raise ValueError(f"{name}: line {number}: values of {word!r} are not all numbers") from None
            matrix[rows_of[word]] = vector
            found.add(word)
    return matrix, found
