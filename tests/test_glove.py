"""stages.modeling.glove: streaming GloVe rows for a vocabulary from a .txt or a .zip."""
from __future__ import annotations

import zipfile

import numpy as np
import pytest

from stages.modeling.glove import VAL_OOV_STD, read_glove, zip_member

GLOVE_4D = "the 1 1 1 1\nred 0.5 0 0 -0.5\n. 7 7 7 7\nblue 2 2 2 2\nred 9 9 9 9\n"


@pytest.fixture
def glove_txt(tmp_path):
    path = tmp_path / "glove.test.4d.txt"
    path.write_text(GLOVE_4D)
    return path


def test_rows_of_found_words_and_random_rows_for_the_rest(glove_txt):
    words = ["<UNK>", "red", "green", ".", "blue"]
    matrix, found = read_glove(glove_txt, words, 4, reserved=1)
    assert matrix.dtype == np.float32 and matrix.shape == (5, 4)
    assert found == {"red", ".", "blue"}
    assert matrix[1].tolist() == [0.5, 0, 0, -0.5]  # the first occurrence of a word wins
    assert matrix[3].tolist() == [7, 7, 7, 7] and matrix[4].tolist() == [2, 2, 2, 2]
    assert np.abs(matrix[[0, 2]]).max() < 1  # <UNK> and the missing word: small random draws
    again, _ = read_glove(glove_txt, words, 4, reserved=1)
    assert np.array_equal(matrix, again)  # seeded
    other, _ = read_glove(glove_txt, words, 4, reserved=1, seed=1)
    assert not np.array_equal(matrix[0], other[0]) and np.array_equal(matrix[1], other[1])


def test_reserved_rows_are_never_looked_up(glove_txt):
    matrix, found = read_glove(glove_txt, ["the", "red"], 4, reserved=1)
    assert found == {"red"} and matrix[0].tolist() != [1, 1, 1, 1]
    matrix, found = read_glove(glove_txt, ["the", "red"], 4)
    assert found == {"the", "red"} and matrix[0].tolist() == [1, 1, 1, 1]


def test_missing_words_follow_vals_scale(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("the 1 1 1 1\n")
    matrix, found = read_glove(path, [f"w{i}" for i in range(2000)], 4)
    assert not found
    assert abs(matrix.std() - VAL_OOV_STD) < 0.005 and abs(matrix.mean()) < 0.005
    wider, _ = read_glove(path, ["a", "b"] * 500, 4, oov_std=1.0)  # AMC's scale (nn.Embedding default)
    assert 0.9 < wider.std() < 1.1


def test_a_line_of_another_dimension_names_file_and_line(tmp_path, glove_txt):
    bad = tmp_path / "bad.txt"
    bad.write_text("the 1 1 1 1\nred 0.5 0 0\nblue 2 2 2 2\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 2: 3 values, expected 4"):
        read_glove(bad, ["blue"], 4)
    with pytest.raises(ValueError, match=r"glove.test.4d.txt: line 1: 4 values, expected 3"):
        read_glove(glove_txt, ["red"], 3)  # glove_dim wrong for the file: fails at once
    with pytest.raises(ValueError, match=r"glove.test.4d.txt: line 1: 4 values, expected 5"):
        read_glove(glove_txt, ["red"], 5)
    nan = tmp_path / "nan.txt"
    nan.write_text("the 1 1 1 1\nred 1 x 1 1\n")
    with pytest.raises(ValueError, match=r"nan.txt: line 2: values of 'red' are not all numbers"):
        read_glove(nan, ["red"], 4)


def test_words_with_spaces_blank_lines_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "g.txt"
    path.write_bytes(b"the 1 1 1 1\r\n. . . 3 3 3 3\n\nat name@domain.com 4 4 4 4\nred 5 5 5 5 \nblue 6 6 6 6")
    matrix, found = read_glove(path, ["red", "blue", "."], 4)
    assert found == {"red", "blue"}
    assert matrix[0].tolist() == [5] * 4 and matrix[1].tolist() == [6] * 4


def test_non_ascii_words(tmp_path):
    path = tmp_path / "g.txt"
    path.write_bytes("café 1 2 3 4\n".encode() + b"\xff\xfe 0 0 0 0\n")  # an undecodable word is just not matched
    matrix, found = read_glove(path, ["café"], 4)
    assert found == {"café"} and matrix[0].tolist() == [1, 2, 3, 4]


def test_reading_stops_once_every_word_is_found(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("red 1 1 1 1\nbroken line\n")
    _, found = read_glove(path, ["red"], 4)
    assert found == {"red"}
    with pytest.raises(ValueError, match="line 2"):
        read_glove(path, ["red", "blue"], 4)


def test_zip_with_one_txt(tmp_path):
    archive = tmp_path / "glove.6B.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("glove.6B.4d.txt", GLOVE_4D)
    matrix, found = read_glove(archive, ["blue", "green"], 4)
    assert found == {"blue"} and matrix[0].tolist() == [2, 2, 2, 2]


def test_zip_with_several_dimensions_picks_by_dim_or_member(tmp_path):
    archive = tmp_path / "glove.6B.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("glove.6B.2d.txt", "red 1 2\nblue 3 4\n")
        zf.writestr("glove.6B.4d.txt", GLOVE_4D)
        zf.writestr("README", "not vectors")
    assert zip_member(archive, 2) == "glove.6B.2d.txt" and zip_member(archive, 4) == "glove.6B.4d.txt"
    matrix, _ = read_glove(archive, ["blue"], 2)
    assert matrix[0].tolist() == [3, 4]
    matrix, _ = read_glove(archive, ["blue"], 4, member="glove.6B.4d.txt")
    assert matrix[0].tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="cannot tell which member holds the 3-d vectors"):
        read_glove(archive, ["blue"], 3)
    with pytest.raises(ValueError, match="no member 'x.txt'"):
        read_glove(archive, ["blue"], 4, member="x.txt")
    with pytest.raises(ValueError, match=r"glove.6B.zip:glove.6B.2d.txt: line 1: 2 values, expected 4"):
        read_glove(archive, ["blue"], 4, member="glove.6B.2d.txt")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GloVe file"):
        read_glove(tmp_path / "glove.840B.300d.txt", ["red"], 300)
