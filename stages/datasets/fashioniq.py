"""FashionIQ (Wu et al. 2021): Amazon product images, each query a reference product and two
relative captions written by annotators ("is longer", "has no sleeves") describing the target.

Sources (XiaoxiaoGuo/fashion-iq), all under `raw_dir` in the community layout:

    captions/cap.<cat>.<split>.json       [{"candidate": ASIN, "target": ASIN, "captions": [c1, c2]}, ...]
                                          (XiaoxiaoGuo/fashion-iq; test files have no "target")
    image_splits/split.<cat>.<split>.json ["ASIN", ...]: the images of a category and split
    image_url/asin2url.<cat>.txt          "ASIN \\t URL" per line (hongwang600/fashion-iq-metadata)
    images/<ASIN>.jpg                     downloaded here from the URL lists; a mirror copied here is used as is
    images/dead_urls.json                 URLs that answered 404/410, not asked again (delete it to retry)

With `annotation_base_url` / `url_list_base_url` set, the annotation files are fetched from
`<base>/captions/...`, `<base>/image_splits/...` and `<url list base>/image_url/...` (once).

Manifest (the protocol of ABaldrati/CLIP4Cir@dfed9f7 src/validate.py):
* one query per triplet, text = the captions stripped of surrounding blanks and trailing '.?',
  joined with `caption_join` (" and "); an empty caption is left out; query_id `<cat>-<split>-<index>`,
  the index of the triplet in its caption file. The manifest split is `train` / `val` / `test`, all
  categories together; the category is in the query id and in the image caption.
* test triplets have no target: ingesting `test` gives its images (a gallery) and no queries.
* images: image_id = ASIN, caption = category; `gallery: split_file` takes every image of the split
  files (the val gallery of CLIP4Cir), `query_images` only the candidates and targets of the queries.
* an ASIN is in one split only. Across categories the real data lists some ASINs in train for one
  category and in val or test for another; such an image goes to the evaluation split (val, then
  test, then train), and the train queries that use it are dropped as `image_in_other_split`, so
  no val image is trained on. Within a category the splits are disjoint.
* an image whose URL is dead (404/410, a 0-byte file) or absent from the URL lists is missing;
  its queries are dropped as `missing_image`. Everything dropped is counted in ingest_report.json,
  with the images that could not be had (ASIN, URL, status); the log of the last download run, with
  the error of each failure, is raw_dir/images/download_report.json. ingest_report.json holds no
  run-dependent numbers (downloaded vs cached), so a rebuild from the same inputs gives the same bytes.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa

from stages.datasets.common import (
    REPORT_FILE,
    Candidate,
    ImageRow,
    IngestReport,
    annotation_files,
    assign_image_splits,
    check_count,
    expect_list,
    expect_string,
    fetch_remembering_dead,
    is_usable_file,
    place_images,
    read_json,
    record_error,
    select_queries,
    tables,
)
from stages.datasets.download import DownloadConfig, Item, Result, write_report
from stages.common.params import require, section
from stages.datasets.evaluation import Evaluation

EVALUATION = Evaluation(splits=("val",), protocols=("fashioniq_val_union", "fashioniq_clip4cir"), ks=(10, 50))

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
# Where an image listed in several splits (by different categories) goes: evaluation splits first.
SPLIT_PRIORITY = ("val", "test", "train")
DEAD_URLS_FILE = "images/dead_urls.json"
DOWNLOAD_LOG_FILE = "images/download_report.json"
PROBLEMS_LISTED = 50

# Counts read in the released annotation files: triplets and split-file images per (category, split), URL lines per category.
DOCUMENTED_TRIPLETS = {
    ("dress", "train"): 5_985, ("dress", "val"): 2_017, ("dress", "test"): 2_024,
    ("shirt", "train"): 5_988, ("shirt", "val"): 2_038, ("shirt", "test"): 2_038,
    ("toptee", "train"): 6_027, ("toptee", "val"): 1_961, ("toptee", "test"): 2_056,
}  # fmt: skip
DOCUMENTED_SPLIT_IMAGES = {
    ("dress", "train"): 11_452, ("dress", "val"): 3_817, ("dress", "test"): 3_818,
    ("shirt", "train"): 19_036, ("shirt", "val"): 6_346, ("shirt", "test"): 6_346,
    ("toptee", "train"): 16_121, ("toptee", "val"): 5_373, ("toptee", "test"): 5_374,
}  # fmt: skip
DOCUMENTED_URL_LINES = {"dress": 19_087, "shirt": 31_728, "toptee": 26_868}

HOW_TO_GET = (
    "FashionIQ annotations: captions/ and image_splits/ are in https://github.com/XiaoxiaoGuo/fashion-iq, "
    "image_url/ in https://github.com/hongwang600/fashion-iq-metadata; put them under raw_dir, or set "
    "dataset.fashioniq.annotation_base_url and url_list_base_url to fetch them."
)


@section
class Config:
    raw_dir: str  # annotations and downloaded images, e.g. data/raw/fashioniq
    annotation_base_url: str | None  # fetch captions/ and image_splits/ from here; None = already in raw_dir
    url_list_base_url: str | None  # fetch image_url/ from here; None = already in raw_dir
    categories: list[Literal["dress", "shirt", "toptee"]]
    splits: list[Literal["train", "val", "test"]]
    gallery: Literal["split_file", "query_images"]
    caption_join: str  # between the two captions of a triplet
    url_rewrite: dict[str, str]  # URL prefix -> replacement (a mirror, https), applied to the URL lists
    expect_full: bool  # assert the documented counts of the full dataset

    def __post_init__(self) -> None:
        require(bool(self.raw_dir), "raw_dir", "must not be empty")
        require(bool(self.categories), "categories", f"must name at least one of {list(CATEGORIES)}")
        require(len(set(self.categories)) == len(self.categories), "categories", f"has duplicates: {self.categories}")
        require(bool(self.splits), "splits", f"must name at least one of {list(SPLITS)}")
        require(len(set(self.splits)) == len(self.splits), "splits", f"has duplicates: {self.splits}")
        require(all(self.url_rewrite), "url_rewrite", "a prefix to replace must not be empty")


@dataclass(frozen=True)
class Triplet:
    index: int  # position in its caption file
    candidate: str  # ASIN of the reference image
    target: str | None  # ASIN of the wanted image; None in the test files
    captions: tuple[str, ...]


@dataclass
class Annotations:
    triplets: dict[tuple[str, str], list[Triplet]]  # (category, split) -> triplets
    split_lists: dict[tuple[str, str], list[str]]  # (category, split) -> ASINs
    urls: dict[str, dict[str, str]]  # category -> ASIN -> URL
    url_lines: dict[str, int]  # category -> lines in its URL list


def caption_file(category: str, split: str) -> str:
    return f"captions/cap.{category}.{split}.json"


def split_file(category: str, split: str) -> str:
    return f"image_splits/split.{category}.{split}.json"


def url_list_file(category: str) -> str:
    return f"image_url/asin2url.{category}.txt"


def image_file(asin: str) -> str:
    return f"images/{asin}.jpg"


# ---------------------------------------------------------------- parsing


def parse_captions(path: Path) -> list[Triplet]:
    triplets = []
    for index, record in enumerate(expect_list(path, read_json(path), "triplets")):
        where = f"record {index}"
        if not isinstance(record, dict):
            raise record_error(path, where, f"expected an object, got {record!r}")
        candidate = expect_string(path, where, record.get("candidate"), "candidate")
        target = expect_string(path, where, record["target"], "target") if "target" in record else None
        captions = record.get("captions")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise record_error(path, where, f"'captions' must be a non-empty list of strings, got {captions!r}")
        triplets.append(Triplet(index, candidate, target, tuple(captions)))
    return triplets


def parse_split_list(path: Path) -> list[str]:
    asins = expect_list(path, read_json(path), "ASINs")
    for index, asin in enumerate(asins):
        expect_string(path, f"entry {index}", asin, "ASIN")
    return asins


def parse_url_list(path: Path) -> tuple[dict[str, str], int]:
    """(ASIN -> URL, number of lines). Lines are 'ASIN <space><TAB><space> URL'; any whitespace around
    or between the two fields is accepted, blank lines are skipped, the first line of an ASIN wins."""
    urls: dict[str, str] = {}
    lines = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise record_error(path, f"line {number}", f"expected 'ASIN URL', got {line!r}")
        lines += 1
        urls.setdefault(fields[0], fields[1])
    return urls, lines


def query_text(captions: tuple[str, ...], join: str) -> str:
    """'is longer.' + ' has no sleeves ' -> 'is longer and has no sleeves' (blank captions left out)."""
    cleaned = (caption.strip().rstrip(".?").strip() for caption in captions)
    return join.join(part for part in cleaned if part)


def read_annotations(cfg: Config, files: dict[str, Path], report: IngestReport) -> Annotations:
    annotations = Annotations({}, {}, {}, {})
    for category in cfg.categories:
        for split in cfg.splits:
            key = (category, split)
            annotations.triplets[key] = parse_captions(report.annotation(files[caption_file(*key)]))
            annotations.split_lists[key] = parse_split_list(report.annotation(files[split_file(*key)]))
        urls, lines = parse_url_list(report.annotation(files[url_list_file(category)]))
        annotations.urls[category], annotations.url_lines[category] = urls, lines
    return annotations


def check_captions_use_listed_images(annotations: Annotations, raw_dir: Path) -> None:
    """Every ASIN of a caption file is in the split file of the same category and split (true of the
    real data); anything else means mismatched files."""
    for key, triplets in annotations.triplets.items():
        listed = set(annotations.split_lists[key])
        for t in triplets:
            for role, asin in (("candidate", t.candidate), ("target", t.target)):
                if asin is not None and asin not in listed:
                    raise record_error(
                        raw_dir / caption_file(*key), f"record {t.index}",
                        f"{role} {asin} is not in {raw_dir / split_file(*key)}",
                    )


def check_documented_counts(annotations: Annotations, raw_dir: Path) -> None:
    for key, triplets in annotations.triplets.items():
        check_count(raw_dir / caption_file(*key), "triplets", DOCUMENTED_TRIPLETS[key], len(triplets))
        listed = len(annotations.split_lists[key])
        check_count(raw_dir / split_file(*key), "ASINs", DOCUMENTED_SPLIT_IMAGES[key], listed)
    for category, lines in annotations.url_lines.items():
        check_count(raw_dir / url_list_file(category), "URL lines", DOCUMENTED_URL_LINES[category], lines)


# ---------------------------------------------------------------- queries and images


def candidates(cfg: Config, annotations: Annotations) -> list[Candidate]:
    return [
        Candidate(
            query_id=f"{category}-{split}-{t.index:05d}",
            split=split,
            reference_id=t.candidate,
            text=query_text(t.captions, cfg.caption_join),
            target_id=t.target,
        )
        for (category, split), triplets in annotations.triplets.items()
        for t in triplets
    ]


def image_listings(cfg: Config, annotations: Annotations) -> list[tuple[str, str, str]]:
    """(ASIN, split, category) for every image the manifest may hold, in file order."""
    listings = []
    for (category, split), triplets in annotations.triplets.items():
        if cfg.gallery == "split_file":
            asins = annotations.split_lists[(category, split)]
        else:
            asins = [asin for t in triplets if t.target is not None for asin in (t.candidate, t.target)]
        listings.extend((asin, split, category) for asin in asins)
    return listings


def rewrite(url: str, rules: dict[str, str]) -> str:
    """Apply the rule with the longest matching prefix, if any."""
    matches = [prefix for prefix in rules if url.startswith(prefix)]
    if not matches:
        return url
    prefix = max(matches, key=len)
    return rules[prefix] + url[len(prefix) :]


def image_urls(cfg: Config, annotations: Annotations, asin_category: dict[str, str]) -> dict[str, str]:
    """ASIN -> URL for the needed ASINs that have one: the image's own category's list first, then any."""
    urls = {}
    for asin, category in asin_category.items():
        url = annotations.urls[category].get(asin)
        if url is None:
            url = next((annotations.urls[c][asin] for c in cfg.categories if asin in annotations.urls[c]), None)
        if url is not None:
            urls[asin] = rewrite(url, cfg.url_rewrite)
    return urls


def count_shared_urls(urls: dict[str, str]) -> int:
    """ASINs whose URL another needed ASIN has too (placeholder pictures, brand logos)."""
    owners: dict[str, int] = {}
    for url in urls.values():
        owners[url] = owners.get(url, 0) + 1
    return sum(1 for url in urls.values() if owners[url] > 1)


def download_summary(urls: dict[str, str], results: list[Result]) -> dict:
    """Counts and the first failures, without what changes from run to run (cached vs downloaded, errors)."""
    problems = [
        {"asin": asin, "url": result.item.url, "status": result.status}
        for asin, result in zip(urls, results)
        if not result.ok
    ]
    return {
        "ok": sum(1 for r in results if r.ok),
        "missing": sum(1 for r in results if r.status == "missing"),
        "failed": sum(1 for r in results if r.status == "failed"),
        "problems": problems[:PROBLEMS_LISTED],
    }


def build(cfg: Config, out_dir: Path, download: DownloadConfig) -> tuple[pa.Table, pa.Table]:
    """Fetch what is missing under raw_dir, link the images into out_dir, return the manifests."""
    raw_dir, out_dir = Path(cfg.raw_dir), Path(out_dir)
    report = IngestReport("fashioniq", raw_dir)
    relative_paths = [f(c, s) for c in cfg.categories for s in cfg.splits for f in (caption_file, split_file)]
    relative_paths += [url_list_file(c) for c in cfg.categories]
    base_urls = {"captions/": cfg.annotation_base_url, "image_splits/": cfg.annotation_base_url,
                 "image_url/": cfg.url_list_base_url}
    files = annotation_files(raw_dir, relative_paths, base_urls, download, HOW_TO_GET)
    annotations = read_annotations(cfg, files, report)
    check_captions_use_listed_images(annotations, raw_dir)
    if cfg.expect_full:
        check_documented_counts(annotations, raw_dir)

    listings = image_listings(cfg, annotations)
    image_split = assign_image_splits(((asin, split) for asin, split, _ in listings), SPLIT_PRIORITY)
    asin_category: dict[str, str] = {}  # the first category listing the ASIN in its assigned split
    for asin, split, category in listings:
        if image_split[asin] == split:
            asin_category.setdefault(asin, category)
    urls = image_urls(cfg, annotations, asin_category)

    items = [Item(url=url, dest=raw_dir / image_file(asin)) for asin, url in urls.items()]
    results = fetch_remembering_dead(items, download, raw_dir / DEAD_URLS_FILE, desc="fashioniq images")
    present = {asin for asin, result in zip(urls, results) if result.ok and is_usable_file(result.item.dest)}

    rows = [
        ImageRow(asin, image_file(asin), image_split[asin], category, raw_dir / image_file(asin))
        for asin, category in asin_category.items()
    ]
    images = place_images(rows, present, out_dir, report)
    queries = select_queries(candidates(cfg, annotations), image_split, present, report)
    without_url = [asin for asin in asin_category if asin not in urls]
    report.extra["images"] = {
        "needed": len(asin_category),
        "present": len(present),
        "without_url": {"count": len(without_url), "first": without_url[:50]},
        "sharing_a_url": count_shared_urls(urls),
    }
    report.extra["downloads"] = download_summary(urls, results)
    write_report(raw_dir / DOWNLOAD_LOG_FILE, results)
    if len(present) < len(asin_category):
        print(f"warning: fashioniq: {len(asin_category) - len(present):,} of {len(asin_category):,} images could not "
              f"be had (dead or unlisted URLs, see {raw_dir / DOWNLOAD_LOG_FILE}); their queries are dropped "
              f"(see {REPORT_FILE})", file=sys.stderr)
    report.write(out_dir)
    return tables(images, queries)
