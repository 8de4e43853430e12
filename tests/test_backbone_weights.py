"""`model.image.weights` by torchvision name (from the torch hub cache, never the network here) or by file."""
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from stages.common.errors import StageError
from stages.common.params import ParamsError, parse
from stages.modeling.factory import ImageConfig, read_image_weights


def image_cfg(weights, encoder="resnet18"):
    return parse(ImageConfig, "model.image", {"encoder": encoder, "weights": weights, "channels": [8]})


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty TORCH_HOME, and any download attempt fails as it would without a network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in this test ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_a_weights_name_loads_from_the_hub_cache_without_the_network(offline_hub):
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    offline_hub.mkdir(parents=True)
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"].fill_(0.5)
    torch.save(state, offline_hub / Path(url).name)  # where torchvision's download would have put it
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        loaded = read_image_weights(image_cfg(name))
        assert torch.equal(loaded["conv1.weight"], torch.full_like(state["conv1.weight"], 0.5)), name


def test_an_uncached_name_without_network_and_an_unknown_name_are_clear_errors(offline_hub):
    with pytest.raises(StageError, match=r"model.image.weights: IMAGENET1K_V2 is not in the cache \(.*resnet50-11ad3fa6.pth\)"):
        read_image_weights(image_cfg("IMAGENET1K_V2", "resnet50"))
    with pytest.raises(ParamsError, match=r"'IMAGENET9K' is neither a file nor a weights name of resnet18 \(torchvision has IMAGENET1K_V1"):
        read_image_weights(image_cfg("IMAGENET9K"))


def test_a_file_path_still_loads_and_a_missing_file_names_the_key(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    assert "fc.weight" in read_image_weights(image_cfg(str(path)))
    with pytest.raises(FileNotFoundError, match="model.image.weights: .*absent.pt does not exist"):
        read_image_weights(image_cfg(str(tmp_path / "absent.pt")))
