"""Stage `vocabulary`: the word vocabulary of the LSTM text encoders, and optionally its GloVe rows.

    python -m stages.vocabulary --shards data/shards --out data/vocab

Reads only the `vocabulary` section of params.yaml. Builds the vocabulary from the query texts of
split `vocabulary.split` with tokenizer `vocabulary.tokenizer` (stages.modeling.vocab) and writes

    <out>/vocab.json        Vocab.state_dict() (tokenizer, words, counts) + size, texts, split
                            (+ glove_path, glove_dim, glove_found, glove_missing with GloVe)
    <out>/word_vectors.npy  only when vocabulary.glove_path is set: float32, len(vocab) x glove_dim,
                            row i = word id i, row 0 = <UNK> (a random row, see stages.modeling.glove)

GloVe is read from the local file `vocabulary.glove_path` (a .txt, or a .zip holding it); it is never
downloaded. The output directory appears only once complete.
"""
from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field
from typing_extensions import Annotated

from stages.shards import store
from stages.common.atomic import atomic_path, staged_dir, write_json
from stages.common.errors import StageError, run_stage
from stages.common.validation import check_from
from stages.modeling.glove import read_glove
from stages.common.params import PARAMS_FILE, declared_task, load, section
from stages.common.cli import stage_parser
from stages.modeling.vocab import VECTORS_FILE, VOCAB_FILE, Vocab



@section
class VocabularyConfig:
    tokenizer: Literal["tirg", "nltk"]
    glove_path: Optional[str]  # a local GloVe .txt or .zip; null = no word vectors
    glove_dim: Annotated[int, Field(gt=0)]
    split: str  # the split whose texts make the vocabulary (the training split)
    # queries: modification texts (composed) | captions: image captions (matching) | auto: as the dataset's
    # declaration says (queries for a composed-retrieval dataset, captions for a matching one)
    texts: Literal["auto", "queries", "captions"]


def texts_of(cfg: VocabularyConfig, declared: dict | None) -> str:
    """`cfg.texts` with auto resolved from the dataset's declaration."""
    if cfg.texts != "auto":
        return cfg.texts
    if declared is None:
        raise StageError("vocabulary.texts: auto reads the dataset's declaration (evaluation.json in the shards), "
                         "which these shards lack: re-run prepare, resize and shard, or set queries / captions")
    return "queries" if declared_task(declared) == "composed" else "captions"


def build(shard_dir: Path | str, out: Path | str, cfg: VocabularyConfig) -> dict[str, Any]:
    """Write `out` (see the module doc); returns what vocab.json holds besides the state."""
    shard_dir, out = store.location(shard_dir), Path(out)
    glove = None
    if cfg.glove_path is not None:
        glove = Path(cfg.glove_path)
        if not glove.is_file():
            raise StageError(f"vocabulary.glove_path: {glove} does not exist (GloVe is never downloaded; "
                             f"put the file there or set vocabulary.glove_path: null)")
    store.read_index(shard_dir)
    cfg = dataclasses.replace(cfg, texts=texts_of(cfg, store.read_evaluation(shard_dir)))
    if cfg.texts == "queries":
        train_texts = [query["text"] for query in store.iter_queries(shard_dir, cfg.split)]
    else:
        train_texts = [text for _, _, text in store.iter_captions(shard_dir, cfg.split)]
    if not train_texts:
        raise StageError(f"{shard_dir}: split {cfg.split!r} has no {cfg.texts} to build a vocabulary from")
    vocab = Vocab.build(train_texts, cfg.tokenizer)
    summary: dict[str, Any] = {"size": len(vocab), "texts": len(train_texts), "split": cfg.split}
    with staged_dir(out) as work:
        if glove is not None:
            try:
                vectors, found = read_glove(glove, vocab.words, cfg.glove_dim, reserved=1)
            except ValueError as err:
                raise StageError(f"vocabulary.glove_path: {err}") from None
            with atomic_path(work / VECTORS_FILE) as tmp, open(tmp, "wb") as f:
                np.save(f, vectors)
            summary |= {"glove_path": str(glove), "glove_dim": cfg.glove_dim,
                        "glove_found": len(found), "glove_missing": len(vocab) - 1 - len(found)}
        write_json(work / VOCAB_FILE, {**vocab.state_dict(), **summary})
    return summary


def line(summary: dict[str, Any], cfg: VocabularyConfig, out: Path | str) -> str:
    glove = ""
    if "glove_found" in summary:
        known = summary["size"] - 1
        share = summary["glove_found"] / known if known else 0.0
        glove = (f", GloVe {summary['glove_dim']}-d found {summary['glove_found']}/{known} "
                 f"({share:.1%}) -> {Path(out) / VECTORS_FILE}")
    return (f"vocabulary: {summary['size']} ids ({cfg.tokenizer} tokenizer) from {summary['texts']} "
            f"{summary['split']} texts{glove} -> {Path(out) / VOCAB_FILE}")


def check_params(params_path: Path | str = PARAMS_FILE, declared: dict | None = None) -> None:
    load(VocabularyConfig, "vocabulary", params_path)


def vocabulary(shard_dir: Path | str, out: Path | str, params_path: Path | str = PARAMS_FILE) -> str:
    """The stage: read `vocabulary` params, build, return the one-line summary."""
    cfg = load(VocabularyConfig, "vocabulary", params_path)  # its own section first: a params error needs no shards
    check_from("vocabulary", params_path, store.read_evaluation(store.location(shard_dir)))
    return line(build(shard_dir, out, cfg), cfg, out)


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "python -m stages.vocabulary --shards data/shards --out data/vocab",
                          "output directory: vocab.json (+ word_vectors.npy with GloVe)")
    parser.add_argument("--shards", type=store.location, required=True, help=store.LOCATION_HELP)
    args = parser.parse_args(argv)
    run_stage(lambda: print(vocabulary(args.shards, args.out, args.params)))


if __name__ == "__main__":
    main()
