import numpy as np
import pytest
import torch

from stages.common.errors import StageError
from stages.retrieval.offline_candidates import mine_candidates, read_candidates, write_candidates


def _data(seed: int, integer: bool = False):
    """13 images with 1..4 captions each (shuffled caption order), 8-d embeddings. Integer-valued
    embeddings give exact, frequent score ties."""
    g = torch.Generator().manual_seed(seed)
    n = 13
    counts = torch.randint(1, 5, (n,), generator=g)
    counts[0] = 4  # the most captions of one image is 4
    text_image = torch.arange(n).repeat_interleave(counts)
    text_image = text_image[torch.randperm(len(text_image), generator=g)]
    if integer:
        images = torch.randint(-1, 2, (n, 8), generator=g).float()
        texts = torch.randint(-1, 2, (len(text_image), 8), generator=g).float()
    else:
        images = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1)
        texts = torch.nn.functional.normalize(torch.randn(len(text_image), 8, generator=g), dim=1)
    return images, texts, text_image


def _brute_force(images, texts, text_image, i2t_k, t2i_k):
    """Full matrices, own entries masked, stable descending sort: best first, lower row on ties."""
    scores = images @ texts.T
    own = text_image[None, :] == torch.arange(len(images))[:, None]  # n x m
    i2t = torch.sort(scores.masked_fill(own, float("-inf")), dim=1, descending=True, stable=True).indices[:, :i2t_k]
    t2i = torch.sort(scores.T.masked_fill(own.T, float("-inf")), dim=1, descending=True, stable=True).indices[:, :t2i_k]
    return i2t, t2i


@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("query_chunk,gallery_chunk", [(3, 5), (1000, 1000), (1, 2)])
def test_candidates_match_brute_force(integer, query_chunk, gallery_chunk):
    images, texts, text_image = _data(1, integer)
    m = len(texts)
    for i2t_k, t2i_k in [(5, 3), (m - 4, 12)]:  # the largest allowed ks included
        i2t, t2i = mine_candidates(images, texts, text_image, i2t_k, t2i_k, query_chunk, gallery_chunk)
        want_i2t, want_t2i = _brute_force(images, texts, text_image, i2t_k, t2i_k)
        assert i2t.dtype == t2i.dtype == torch.long
        assert i2t.shape == (13, i2t_k) and t2i.shape == (m, t2i_k)
        assert torch.equal(i2t, want_i2t)
        assert torch.equal(t2i, want_t2i)
        # exclusion, explicitly: no image retrieves one of its own captions, no caption its own image
        for image in range(13):
            assert not set(i2t[image].tolist()) & set(torch.nonzero(text_image == image).flatten().tolist())
        assert not bool((t2i == text_image[:, None]).any())


def test_ties_go_to_the_lower_row_even_at_the_kth_place():
    # image 0 sees captions 2..5 all at score 1 (caption 1 is its own); k = 2 keeps rows 2 and 3.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0]] + [[1.0, 0.0]] * 4)
    text_image = torch.tensor([1, 0, 2, 2, 1, 1])
    i2t, t2i = mine_candidates(images, texts, text_image, 2, 1, query_chunk=1, gallery_chunk=2)
    assert i2t[0].tolist() == [2, 3]
    # caption 0 ([0,1]) ties images 1 (its own) and 2 at 1.0 -> image 2; caption 1 ([1,0], own image 0)
    # ties images 1 and 2 at 0 -> the lower row, 1; captions 2..5 ([1,0]) -> image 0 (1.0)
    assert t2i[:, 0].tolist() == [2, 1, 0, 0, 0, 0]
    for k in range(1, 4):  # every allowed cut (k <= 6 - 3) of the 4-way tie keeps the lowest rows
        assert mine_candidates(images, texts, text_image, k, 1, 1, 1)[0][0].tolist() == [2, 3, 4, 5][:k]


def test_ks_beyond_the_available_candidates_raise():
    images, texts, text_image = _data(2)
    m = len(texts)
    with pytest.raises(ValueError, match=rf"mine\.aoq_i2t_k={m - 3} must be in 1\.\.{m - 4}"):
        mine_candidates(images, texts, text_image, m - 3, 3)
    with pytest.raises(ValueError, match="mine.aoq_i2t_k=0"):
        mine_candidates(images, texts, text_image, 0, 3)
    with pytest.raises(ValueError, match=r"mine\.aoq_t2i_k=13 must be in 1\.\.12"):
        mine_candidates(images, texts, text_image, 3, 13)
    with pytest.raises(ValueError, match="outside"):
        mine_candidates(images, texts, torch.full_like(text_image, 13), 3, 3)


def test_write_read_round_trip(tmp_path):
    images, texts, text_image = _data(3)
    i2t, t2i = mine_candidates(images, texts, text_image, 6, 4, 4, 4)
    image_ids = [f"img{i}" for i in range(13)]
    caption_ids = [f"cap{c}" for c in range(len(texts))]
    path = tmp_path / "out" / "aoq_candidates.npz"
    write_candidates(path, i2t, t2i, image_ids, caption_ids)
    assert [p.name for p in path.parent.iterdir()] == ["aoq_candidates.npz"]  # no temp file left, no ".npz.npz"
    with np.load(path) as data:
        assert data["i2t"].dtype == data["t2i"].dtype == np.int32
    back = read_candidates(path)
    assert torch.equal(back[0], i2t) and torch.equal(back[1], t2i)
    assert back[2] == image_ids and back[3] == caption_ids


def test_bad_files_and_arrays_raise_naming_the_file(tmp_path):
    images, texts, text_image = _data(4)
    i2t, t2i = mine_candidates(images, texts, text_image, 6, 4)
    image_ids, caption_ids = [f"i{i}" for i in range(13)], [f"c{c}" for c in range(len(texts))]
    path = tmp_path / "cand.npz"
    write_candidates(path, i2t, t2i, image_ids, caption_ids)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StageError, match=r"cand\.npz: unreadable candidates file"):
        read_candidates(path)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        read_candidates(tmp_path / "missing.npz")
    with pytest.raises(StageError, match=r"x\.npz \(not written\): t2i has shape \(33, 4\)"):
        write_candidates(tmp_path / "x.npz", i2t, t2i[:-1], image_ids, caption_ids)
    with pytest.raises(StageError, match="caption rows outside"):
        write_candidates(tmp_path / "x.npz", i2t + len(texts), t2i, image_ids, caption_ids)
    assert not (tmp_path / "x.npz").exists()
    np.savez(tmp_path / "other.npz", i2t=np.zeros((2, 2), np.int32))
    with pytest.raises(StageError, match=r"other\.npz: not a candidates file, array 't2i' is missing"):
        read_candidates(tmp_path / "other.npz")
    np.savez(tmp_path / "short.npz", i2t=np.zeros((2, 2), np.int32), t2i=np.zeros((3, 1), np.int32),
             image_ids=np.array(["a", "b", "c"]), caption_ids=np.array(["x", "y", "z"]))
    with pytest.raises(StageError, match=r"short\.npz: i2t has shape \(2, 2\), expected \(3, k >= 1\)"):
        read_candidates(tmp_path / "short.npz")
