"""Fashion200k (Han et al., ICCV 2017) with TIRG's queries: change one word of a product description.

Source: the label files and images come from the Google Drive folder of xthan/fashion-200k (DRIVE_URL,
a manual step: Drive needs a browser); TIRG's test_queries.txt is fetched from `test_queries_url`.
`raw_dir` holds
    labels/{dress,jacket,pants,skirt,top}_{train,test}_detect_all.txt
    women/<category>/<subcategory>/<id>/<id>_<k>.jpeg     (or women.tar.gz, extracted here once)
    test_queries.txt

This adapter follows google/tirg datasets.py `Fashion200k`:
  * the label files of a split are the files in labels/ whose name contains the split's name; a line
    is `image path<TAB>detection score<TAB>description`;
  * caption (`caption_post_process`): the description stripped, then '.'->'dotmark', '?'->'questionmark',
    '&'->'andmark', '*'->'starmark';
  * test queries (`generate_test_queries_`): each line `source target` of test_queries.txt, with text
    "replace <w_src> with <w_tgt>" (`get_different_word`): w_src is the first source word not in the
    target caption, w_tgt the first target word not in the source (when every word is shared, TIRG's
    loop leaves the last word, and so does this);
  * training (`caption_index_init_`, `caption_index_sample_`): a parent of a caption is the caption
    with one word removed (`c.replace(w, '')`, then '  '->' ' and strip); captions with a common
    parent are siblings; an image is modifiable when its caption has a parent with two or more
    children. A training pair: a modifiable image, a random one of its parents, a random sibling
    caption other than its own, a random image of that caption; text as for test queries.

What the manifest fixes, since it holds one row per query where TIRG samples on the fly:
  * test target_id: the target file of the line. Many images share a caption and TIRG counts any
    image with the target caption as correct; the caption is in images.parquet, so caption-level
    recall (google/tirg test_retrieval.py) is computed from the manifests.
  * train: one query per modifiable training image, drawn with `seed`; with `max_train_queries` a
    seeded sample of that many modifiable images (in label order).
  * image_id: the path as the label files write it (women/.../51727804_0.jpeg, case kept);
    path: images/<that path>.
  * a labelled image without its file is left out; the caption index for training uses the images
    on disk only. A test query whose image is missing, or not in the test label files (TIRG would
    stop with a KeyError), is dropped and reported; with `expect_full` the latter is an error.
  * a path labelled twice: the first line wins (test files are read first, so an image listed in
    both splits stays a test image); the others are reported.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from stages.common.errors import StageError
from stages.datasets.archives import download_file, extract_once
from stages.datasets.common import (
    MISSING_IMAGE,
    Ingest,
    check_count,
    listed,
    safe_relative_path,
    write_ingest_report,
)
from stages.datasets.download import DownloadConfig, sha256_of
from stages.common.params import require, section
from stages.datasets.evaluation import Evaluation

EVALUATION = Evaluation(splits=("test",), protocols=("caption",), ks=(1, 10, 50))  # TIRG's Fashion200k table

DRIVE_URL = "https://drive.google.com/drive/folders/0B4Eo9mft9jwoamlYWFZBSHFzV3c?resourcekey=0-2s7M82p8Bn7riqxWVlgctw"
TEST_QUERIES_FILE = "test_queries.txt"
IMAGES_ARCHIVE = "women.tar.gz"
# Test files first: an image labelled in both splits stays in test, where TIRG's fixed queries need it.
READ_ORDER = ("test", "train")
NOT_IN_TEST_LABELS = "not_in_test_labels"  # a drop reason

# Counts from a TIRG run log in a third-party repository, not verified here: checked only with expect_full.
EXPECTED_LABEL_LINES = {"train": 172_049, "test": 29_789}
EXPECTED_TEST_QUERIES = 33_480

# google/tirg datasets.py caption_post_process, in its order.
CAPTION_REPLACEMENTS = ((".", "dotmark"), ("?", "questionmark"), ("&", "andmark"), ("*", "starmark"))


@section
class Config:
    raw_dir: str  # where the raw data is, e.g. data/raw/fashion200k
    test_queries_url: str | None  # TIRG's test_queries.txt; None: it is already in raw_dir
    expect_full: bool  # check the documented counts of the full dataset
    seed: int  # draws the training queries
    max_train_queries: int | None  # None: one query per modifiable training image

    def __post_init__(self) -> None:
        require(bool(self.raw_dir), "raw_dir", "must not be empty")
        require(self.max_train_queries is None or self.max_train_queries > 0, "max_train_queries",
                f"must be > 0 or null, got {self.max_train_queries}")


@dataclass(frozen=True)
class Label:
    path: str  # the image, relative to raw_dir, as written
    caption: str  # after TIRG's clean-up
    where: str  # "labels/<file>:<line number>"


@dataclass
class LabelStats:
    lines: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # split -> non-blank lines
    blank_lines: int = 0
    lines_with_extra_fields: int = 0  # more than three non-empty fields (TIRG ignores the rest)


# ---------------------------------------------------------------- captions and query text


def clean_caption(description: str) -> str:
    """google/tirg `caption_post_process`: strip, then spell out '.', '?', '&' and '*'."""
    caption = description.strip()
    for mark, word in CAPTION_REPLACEMENTS:
        caption = caption.replace(mark, word)
    return caption


def _first_word_not_in(words: list[str], others: list[str]) -> str:
    for word in words:
        if word not in others:
            return word
    return words[-1] if words else ""  # TIRG's loop variable keeps the last word when none differs


def modification_text(source_caption: str, target_caption: str) -> str:
    """google/tirg `get_different_word`: 'replace <first source word not in target> with <first target
    word not in source>'."""
    source_words, target_words = source_caption.split(), target_caption.split()
    source_word = _first_word_not_in(source_words, target_words)
    target_word = _first_word_not_in(target_words, source_words)
    return f"replace {source_word} with {target_word}"


def parent_captions(caption: str) -> list[str]:
    """google/tirg `caption_index_init_`: the caption without each of its words in turn (`replace`
    removes every occurrence of the word, inside other words too, exactly as TIRG does)."""
    return [caption.replace(word, "").replace("  ", " ").strip() for word in caption.split()]


# ---------------------------------------------------------------- reading the files


def obtain(cfg: Config, download: DownloadConfig) -> dict | None:
    """Check the manual part (labels/, and women/ or women.tar.gz), extract women.tar.gz once (a marker
    beside it records that; without the marker it is extracted even over an existing women/), and
    fetch test_queries.txt when absent. Returns the extraction record, or None without an archive."""
    raw_dir = Path(cfg.raw_dir)
    manual = (f"download labels/ and {IMAGES_ARCHIVE} by hand from the Google Drive folder {DRIVE_URL} "
              f"(Drive needs a browser) into {raw_dir}")
    if not (raw_dir / "labels").is_dir():
        raise StageError(f"{raw_dir / 'labels'}: missing; {manual}")
    extraction = None
    if (raw_dir / IMAGES_ARCHIVE).is_file():
        extraction = extract_once(raw_dir / IMAGES_ARCHIVE, raw_dir)
    if not (raw_dir / "women").is_dir():
        raise StageError(f"{raw_dir / 'women'}: missing (the images); {manual}")
    queries_file = raw_dir / TEST_QUERIES_FILE
    if not queries_file.is_file():
        if cfg.test_queries_url is None:
            raise StageError(f"{queries_file}: missing; set test_queries_url, or download it from "
                             f"https://storage.googleapis.com/image_retrieval_css/test_queries.txt")
        download_file(cfg.test_queries_url, queries_file, download, "download fashion200k test queries")
    return extraction


def label_files(labels_dir: Path, split: str) -> list[Path]:
    """TIRG: every file in labels/ whose name contains the split's name (sorted here)."""
    files = sorted(p for p in labels_dir.iterdir() if p.is_file() and split in p.name)
    if not files:
        raise StageError(f"{labels_dir}: no label file for split {split!r} (e.g. dress_{split}_detect_all.txt)")
    return files


def text_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line; a line that is not UTF-8 is a StageError naming it."""
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            lines.append((number, raw.decode("utf-8")))
        except UnicodeDecodeError as err:
            raise StageError(f"{path}:{number}: not UTF-8 text ({err})") from None
    return lines


def read_labels(path: Path, where_prefix: str, stats: LabelStats, split: str) -> list[Label]:
    """The lines of one label file; a line without path, score and description is a StageError."""
    labels = []
    for number, text in text_lines(path):
        where = f"{where_prefix}:{number}"
        if not text.strip():
            stats.blank_lines += 1
            continue
        stats.lines[split] += 1
        fields = text.split("\t")
        if len(fields) < 3:
            raise StageError(f"{path}:{number}: expected 'image path<TAB>detection score<TAB>description', "
                             f"found {text!r}")
        image_path, score = fields[0].strip(), fields[1].strip()
        try:
            float(score)
        except ValueError:
            raise StageError(f"{path}:{number}: detection score {score!r} is not a number") from None
        safe_relative_path(image_path, f"{path}:{number}")
        if any(extra.strip() for extra in fields[3:]):
            stats.lines_with_extra_fields += 1
        labels.append(Label(image_path, clean_caption(fields[2]), where))
    return labels


def read_test_queries(path: Path) -> list[tuple[int, str, str]]:
    """(line number, source path, target path) of each line of test_queries.txt (TIRG: `line.split()`)."""
    pairs = []
    for number, text in text_lines(path):
        words = text.split()
        if not words:
            continue
        if len(words) != 2:
            raise StageError(f"{path}:{number}: expected 'source_image_path target_image_path', found {text!r}")
        pairs.append((number, words[0], words[1]))
    return pairs


# ---------------------------------------------------------------- images and queries


@dataclass
class Collected:
    ingest: Ingest
    split_of: dict[str, str]  # every labelled path (with a file or not) -> its split
    caption_of: dict[str, str]
    duplicates: list[str]  # "labels/<file>:<line>: <path> (first at ...)"


def collect_images(raw_dir: Path, labels: dict[str, list[Label]]) -> Collected:
    """Every labelled image once (the first line wins); those without a file are recorded as missing."""
    collected = Collected(Ingest(), {}, {}, [])
    first_at: dict[str, str] = {}
    for split in READ_ORDER:
        for label in labels[split]:
            if label.path in first_at:
                collected.duplicates.append(f"{label.where}: {label.path} (first at {first_at[label.path]})")
                continue
            first_at[label.path] = label.where
            collected.split_of[label.path] = split
            collected.caption_of[label.path] = label.caption
            collected.ingest.add_image(raw_dir / label.path, label.path, f"images/{label.path}", split, label.caption)
    return collected


def add_test_queries(collected: Collected, pairs: list[tuple[int, str, str]], queries_file: str,
                     expect_full: bool) -> None:
    """TIRG's fixed test queries; a query naming an image that is not in the test labels or not on
    disk is dropped (with expect_full, one not in the test labels is an error)."""
    ingest = collected.ingest
    for number, source, target in pairs:
        query_id = f"test-{number:06d}"
        unlabelled = [path for path in (source, target) if collected.split_of.get(path) != "test"]
        if unlabelled and expect_full:
            raise StageError(f"{queries_file}:{number}: {unlabelled[0]} is not in the test label files "
                             f"(the full dataset has every query image there)")
        if unlabelled:
            ingest.drop(query_id, "test", NOT_IN_TEST_LABELS, ", ".join(unlabelled))
            continue
        missing = [path for path in (source, target) if path not in ingest.sources]
        if missing:
            ingest.drop(query_id, "test", MISSING_IMAGE, ", ".join(missing))
            continue
        text = modification_text(collected.caption_of[source], collected.caption_of[target])
        ingest.add_query(query_id, "test", source, text, target)


@dataclass(frozen=True)
class CaptionIndex:
    """google/tirg `caption_index_init_` over the training images on disk."""
    images_of: dict[str, list[str]]  # caption -> image ids, in label order
    children_of: dict[str, list[str]]  # parent caption (with >= 2 children) -> child captions
    parents_of: dict[str, list[str]]  # caption -> its parents that have >= 2 children

    @classmethod
    def of(cls, images: list[dict]) -> CaptionIndex:
        images_of: dict[str, list[str]] = defaultdict(list)
        for row in images:
            images_of[row["caption"]].append(row["image_id"])
        children: dict[str, dict[str, None]] = defaultdict(dict)  # an ordered set per parent
        for caption in images_of:
            for parent in parent_captions(caption):
                children[parent][caption] = None
        children_of = {parent: list(kids) for parent, kids in children.items() if len(kids) >= 2}
        parents_of: dict[str, list[str]] = defaultdict(list)
        for parent, kids in children_of.items():
            for caption in kids:
                parents_of[caption].append(parent)
        return cls(dict(images_of), children_of, dict(parents_of))

    def sample_target(self, caption: str, rng: random.Random) -> tuple[str, str]:
        """(target caption, target image id), drawn as `caption_index_sample_` does."""
        parents = self.parents_of[caption]
        while True:  # every parent has another child, so this ends
            sibling = rng.choice(self.children_of[rng.choice(parents)])
            if sibling != caption:
                break
        return sibling, rng.choice(self.images_of[sibling])


def add_train_queries(ingest: Ingest, seed: int, max_queries: int | None) -> dict:
    """One query per modifiable training image (or a seeded sample of max_queries of them); returns counts."""
    rng = random.Random(seed)
    train = [row for row in ingest.images if row["split"] == "train"]
    index = CaptionIndex.of(train)
    modifiable = [row for row in train if row["caption"] in index.parents_of]
    sources = modifiable
    if max_queries is not None and len(modifiable) > max_queries:
        sources = [modifiable[i] for i in sorted(rng.sample(range(len(modifiable)), max_queries))]
    for number, row in enumerate(sources):
        target_caption, target_id = index.sample_target(row["caption"], rng)
        ingest.add_query(f"train-{number:06d}", "train", row["image_id"],
                         modification_text(row["caption"], target_caption), target_id)
    return {"unique_captions": len(index.images_of), "modifiable_images": len(modifiable)}


def build(cfg: Config, out_dir: Path, download: DownloadConfig) -> tuple[pa.Table, pa.Table]:
    """Link the Fashion200k images into out_dir/images, write out_dir/ingest_report.json, return the manifests."""
    out_dir, raw_dir = Path(out_dir), Path(cfg.raw_dir)
    extraction = obtain(cfg, download)
    stats = LabelStats()
    files = {split: label_files(raw_dir / "labels", split) for split in READ_ORDER}
    labels = {split: [label for path in files[split]
                      for label in read_labels(path, f"labels/{path.name}", stats, split)] for split in READ_ORDER}
    pairs = read_test_queries(raw_dir / TEST_QUERIES_FILE)
    if cfg.expect_full:
        for split in READ_ORDER:
            check_count(f"labels/*{split}*", f"{split} label lines", EXPECTED_LABEL_LINES[split], stats.lines[split])
        check_count(TEST_QUERIES_FILE, "query lines", EXPECTED_TEST_QUERIES, len(pairs))
    collected = collect_images(raw_dir, labels)
    add_test_queries(collected, pairs, TEST_QUERIES_FILE, cfg.expect_full)
    train_counts = add_train_queries(collected.ingest, cfg.seed, cfg.max_train_queries)
    ingest = collected.ingest
    copied = ingest.link_images(out_dir, "fashion200k")
    read = [path for split in READ_ORDER for path in files[split]] + [raw_dir / TEST_QUERIES_FILE]
    report = ingest.report("fashion200k", raw_dir,
                           {path.relative_to(raw_dir).as_posix(): sha256_of(path) for path in read}, READ_ORDER)
    for split in READ_ORDER:
        report["splits"][split]["label_lines"] = stats.lines[split]
    report["splits"]["train"].update(train_counts)
    write_ingest_report(out_dir, {
        **report,
        "archive": extraction,
        "duplicate_label_lines": listed(collected.duplicates),
        "blank_label_lines": stats.blank_lines,
        "label_lines_with_extra_fields": stats.lines_with_extra_fields,
        "images_copied_not_linked": copied,
    })
    return ingest.tables()
