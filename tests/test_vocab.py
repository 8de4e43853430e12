"""stages.modeling.vocab (tirg / nltk tokenisers, counts, VAL's test-time rare words) and the `vocabulary` stage."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages.shards import store
from stages.common.atomic import write_json
from stages.common.errors import StageError
from stages.common.params import ParamsError
from stages.modeling.vocab import Vocab, tokenize
from stages.vocabulary import VocabularyConfig, main, vocabulary

# --- tokenisers ----------------------------------------------------------------------------------

SENTENCES = {
    "It's shorter, and red.": (
        ["its", "shorter", "and", "red"],
        ["it", "'s", "shorter", ",", "and", "red", "."],
    ),
    "Doesn't have a collar; it's blue (navy)": (
        ["doesnt", "have", "a", "collar", "its", "blue", "navy"],
        ["does", "n't", "have", "a", "collar", ";", "it", "'s", "blue", "(", "navy", ")"],
    ),
    'Is a "cute" dress... and has no sleeves!': (
        ["is", "a", "cute", "dress", "and", "has", "no", "sleeves"],
        ["is", "a", "``", "cute", "''", "dress", "...", "and", "has", "no", "sleeves", "!"],
    ),
    "Café-style top, 3.5 inches longer": (
        ["cafstyle", "top", "35", "inches", "longer"],  # tirg drops non-ASCII, then punctuation
        ["café-style", "top", ",", "3.5", "inches", "longer"],
    ),
    "replace Drdotmark with blue": (["replace", "drdotmark", "with", "blue"], ["replace", "drdotmark", "with", "blue"]),
    "": ([], []),
}


@pytest.mark.parametrize("text", list(SENTENCES))
def test_tirg_and_nltk_tokenisers(text):
    tirg, nltk = SENTENCES[text]
    assert tokenize(text) == tirg
    assert tokenize(text, "tirg") == tirg
    assert tokenize(text, "nltk") == nltk


def test_nltk_tokeniser_keeps_a_sentence_end_inside_the_text_on_its_word():
    # word_tokenize would split "revealing." (Punkt sentence splitting, unavailable offline): documented difference
    assert tokenize("Is more revealing. Has a v-neck", "nltk") == ["is", "more", "revealing.", "has", "a", "v-neck"]


def test_unknown_tokeniser_is_an_error():
    with pytest.raises(ValueError, match="unknown tokenizer 'spacy'"):
        tokenize("red", "spacy")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        Vocab(["red"], "spacy")


# --- the vocabulary ------------------------------------------------------------------------------


def test_build_sorts_counts_and_keeps_unk_at_zero():
    vocab = Vocab.build(["red dress", "Red shirt.", "blue dress"])
    assert vocab.words == ["<UNK>", "blue", "dress", "red", "shirt"] and len(vocab) == 5
    assert vocab.counts == [1, 2, 2, 1] and vocab.tokenizer == "tirg"
    assert Vocab.build(["blue dress", "Red shirt.", "red dress"]).words == vocab.words  # text order does not matter
    assert vocab.encode("a red, red dress") == [Vocab.UNK, 3, 3, 2]
    assert vocab.encode("") == [Vocab.UNK] and vocab.encode("...") == [Vocab.UNK]


def test_nltk_vocab_encodes_with_its_own_tokeniser():
    vocab = Vocab.build(["it's red.", "it's blue"], "nltk")
    assert vocab.words == ["<UNK>", "'s", ".", "blue", "it", "red"]
    assert vocab.counts == [2, 1, 1, 2, 1]
    assert vocab.encode("It's RED!") == [4, 1, 5, Vocab.UNK]


def test_rare_words_become_unk_only_when_asked():
    vocab = Vocab.build(["red dress", "red shirt", "blue dress"])  # blue 1, dress 2, red 2, shirt 1
    assert vocab.encode("blue dress shirt") == [1, 2, 4]  # training: every word kept
    assert vocab.encode("blue dress shirt", drop_rare_below=2) == [Vocab.UNK, 2, Vocab.UNK]  # VAL at test time
    assert vocab.encode("blue dress", drop_rare_below=3) == [Vocab.UNK, Vocab.UNK]
    tokens, lengths = vocab.batch(["blue dress shirt", "red"], drop_rare_below=2)
    assert tokens.tolist() == [[0, 2, 0], [3, 0, 0]] and lengths.tolist() == [3, 1]
    tokens, _ = vocab.batch(["blue dress shirt", "red"])
    assert tokens.tolist() == [[1, 2, 4], [3, 0, 0]]


def test_state_round_trips_through_json():
    vocab = Vocab.build(["it's red.", "it's blue"], "nltk")
    state = json.loads(json.dumps(vocab.state_dict()))
    assert state == {"tokenizer": "nltk", "words": ["'s", ".", "blue", "it", "red"], "counts": [2, 1, 1, 2, 1]}
    again = Vocab.from_state({**state, "size": 6, "texts": 2})  # the stage's summary keys are ignored
    assert again.words == vocab.words and again.counts == vocab.counts and again.tokenizer == "nltk"
    assert again.encode("it's blue", drop_rare_below=2) == vocab.encode("it's blue", drop_rare_below=2)


def test_old_checkpoints_store_a_plain_word_list():
    vocab = Vocab.from_state(["make", "it", "red"])  # kept in the stored order, not re-sorted
    assert vocab.tokenizer == "tirg" and vocab.counts is None
    assert vocab.words == ["<UNK>", "make", "it", "red"] and vocab.encode("Make it RED!") == [1, 2, 3]
    assert Vocab(["make", "it", "red"]).words == vocab.words
    with pytest.raises(ValueError, match="needs word counts"):
        vocab.encode("red", drop_rare_below=2)
    with pytest.raises(ValueError, match="list of words or a dict"):
        Vocab.from_state({"tokenizer": "tirg"})


def test_words_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        Vocab(["red", "red"])
    with pytest.raises(ValueError, match="2 counts for 1 words"):
        Vocab(["red"], counts=[1, 2])


# --- the stage -----------------------------------------------------------------------------------

TRAIN = ["It's shorter, and red.", "is red and has sleeves", "Café-style, blue"]
TEST = ["has polka dots"]
PARAMS = {"tokenizer": "tirg", "glove_path": None, "glove_dim": 4, "split": "train", "texts": "queries"}


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (shade, shade, shade)).save(buffer, "PNG")
    return buffer.getvalue()


def make_shards(root: Path, texts_by_split: dict[str, list[str]]) -> Path:
    """A shard directory with one query per text (tiny images) and no gallery."""
    images = root / "images"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(png(10))
    (images / "b.png").write_bytes(png(200))
    shard_dir = root / "shards"
    index = {"format": store.INDEX_FORMAT, "splits": {}}
    for split, texts in texts_by_split.items():
        samples = [
            store.query_sample(f"q{n}", {"query_id": f"{split}/{n}", "reference_id": "a", "target_id": "b", "text": t},
                                images / "a.png", images / "b.png")
            for n, t in enumerate(texts)
        ]
        index["splits"][split] = {
            "gallery": {"count": 0, "shards": []},
            "queries": store.write_shards(shard_dir, split, "queries", samples, maxcount=2, maxsize=1 << 20),
        }
    write_json(shard_dir / store.INDEX_FILE, index)
    return shard_dir


def write_params(folder: Path, **changes) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"other": {"x": 1}, "vocabulary": {**PARAMS, **changes}}))
    return path


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    return make_shards(tmp_path / "data", {"train": TRAIN, "test": TEST})


def test_stage_builds_the_vocabulary_of_the_train_split(shard_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # params.yaml is read from the working directory, as DVC runs stages
    write_params(tmp_path)
    main(["--shards", str(shard_dir), "--out", "vocab"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("vocabulary: 10 ids (tirg tokenizer) from 3 train texts")
    state = json.loads((tmp_path / "vocab" / "vocab.json").read_text())
    expected = Vocab.build(TRAIN)
    assert state["words"] == expected.words[1:] and state["counts"] == expected.counts
    assert state["tokenizer"] == "tirg" and state["size"] == 10 and state["texts"] == 3 and state["split"] == "train"
    assert "polka" not in state["words"]  # test texts are not read
    assert "glove_found" not in state and not (tmp_path / "vocab" / "word_vectors.npy").exists()
    assert Vocab.from_state(state).encode("red and blue") == expected.encode("red and blue")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml", "vocab"]  # no temp dirs left


def test_stage_with_nltk_and_another_split(shard_dir, tmp_path):
    params = write_params(tmp_path, tokenizer="nltk", split="test")
    line = vocabulary(shard_dir, tmp_path / "out", params)
    state = json.loads((tmp_path / "out" / "vocab.json").read_text())
    assert state["tokenizer"] == "nltk" and state["words"] == ["dots", "has", "polka"] and state["texts"] == 1
    assert "4 ids (nltk tokenizer) from 1 test texts" in line


def test_stage_writes_glove_rows_and_coverage(shard_dir, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("the 1 1 1 1\nred 0.5 0 0 -0.5\nblue 2 2 2 2\nsleeves 3 0 3 0\nzebra 9 9 9 9\n")
    out = tmp_path / "out"
    line = vocabulary(shard_dir, out, write_params(tmp_path, glove_path=str(glove)))
    state = json.loads((out / "vocab.json").read_text())
    vocab = Vocab.from_state(state)
    vectors = np.load(out / "word_vectors.npy")
    assert vectors.dtype == np.float32 and vectors.shape == (len(vocab), 4)
    assert vectors[vocab.index["red"]].tolist() == [0.5, 0, 0, -0.5]
    assert vectors[vocab.index["sleeves"]].tolist() == [3, 0, 3, 0]
    assert state["glove_found"] == 3 and state["glove_missing"] == len(vocab) - 1 - 3
    assert state["glove_dim"] == 4 and state["glove_path"] == str(glove)
    assert "GloVe 4-d found 3/9 (33.3%)" in line
    again = tmp_path / "again"
    vocabulary(shard_dir, again, write_params(tmp_path, glove_path=str(glove)))
    assert np.array_equal(np.load(again / "word_vectors.npy"), vectors)  # random rows are seeded


def test_missing_glove_file_names_the_key_and_path(shard_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, glove_path="glove/glove.6B.300d.txt")
    with pytest.raises(SystemExit) as exit_info:
        main(["--shards", str(shard_dir), "--out", "vocab"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "vocabulary.glove_path" in err and "glove/glove.6B.300d.txt" in err and "never downloaded" in err
    assert not (tmp_path / "vocab").exists()


def test_bad_glove_line_leaves_no_output(shard_dir, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("the 1 1 1 1\nred 0.5 0 0\n")
    out = tmp_path / "out"
    with pytest.raises(StageError, match=r"vocabulary.glove_path: .*glove.txt: line 2: 3 values, expected 4"):
        vocabulary(shard_dir, out, write_params(tmp_path, glove_path=str(glove)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "glove.txt", "params.yaml"]


def test_missing_shards_split_or_queries_are_clear_errors(tmp_path):
    params = write_params(tmp_path)
    with pytest.raises(StageError, match="index.json: missing"):
        vocabulary(tmp_path / "nowhere", tmp_path / "out", params)
    shard_dir = make_shards(tmp_path / "data", {"train": [], "test": TEST})
    with pytest.raises(StageError, match="split 'train' has no queries"):
        vocabulary(shard_dir, tmp_path / "out", params)
    with pytest.raises(StageError, match="no split 'val'"):
        vocabulary(shard_dir, tmp_path / "out", write_params(tmp_path, split="val"))
    assert not (tmp_path / "out").exists()


def test_params_section_is_checked(tmp_path):
    with pytest.raises(ParamsError, match="vocabulary.tokenizer"):
        vocabulary(tmp_path, tmp_path / "out", write_params(tmp_path, tokenizer="spacy"))
    with pytest.raises(ParamsError, match="vocabulary.glove_dim"):
        vocabulary(tmp_path, tmp_path / "out", write_params(tmp_path, glove_dim=0))
    with pytest.raises(ParamsError, match="vocabulary.min_count: unknown key"):
        vocabulary(tmp_path, tmp_path / "out", write_params(tmp_path, min_count=2))
    cfg = VocabularyConfig(tokenizer="nltk", glove_path=None, glove_dim=300, split="train", texts="queries")
    assert cfg.glove_dim == 300
