"""The `model` section of params.yaml and the function that builds the model it describes."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import Field
from typing_extensions import Annotated

from models.encoders import LSTMTextEncoder, ResNet18Encoder, SmallCNN
from models.tirg import TIRG
from stages.params import parse, require, section

PositiveInt = Annotated[int, Field(gt=0)]


@section
class ImageConfig:
    encoder: Literal["small_cnn", "resnet18"]
    weights: Optional[str]
    channels: list[PositiveInt]

    def __post_init__(self):
        require(self.encoder == "resnet18" or self.weights is None, "image.weights",
                "only the resnet18 encoder loads weights")
        require(len(self.channels) > 0, "image.channels", "needs at least one stage")


@section
class TextConfig:
    embed_dim: PositiveInt
    hidden_dim: PositiveInt
    dropout: Annotated[float, Field(ge=0, lt=1)]


@section
class ModelConfig:
    name: Literal["tirg"]
    embed_dim: PositiveInt
    image: ImageConfig
    text: TextConfig
    norm_scale: Annotated[float, Field(gt=0)]


def build_model(cfg: ModelConfig, vocab_size: int, image_size: int, load_weights: bool = True) -> TIRG:
    """A freshly initialised model; `model.image.weights` (ResNet-18 only) is read from local disk."""
    if cfg.image.encoder == "resnet18":
        state = None
        if cfg.image.weights is not None and load_weights:
            path = Path(cfg.image.weights)
            if not path.is_file():
                raise FileNotFoundError(f"model.image.weights: {path} does not exist (weights are never downloaded)")
            state = torch.load(path, map_location="cpu", weights_only=True)
        image_encoder = ResNet18Encoder(cfg.embed_dim, state)
    else:
        image_encoder = SmallCNN(cfg.image.channels, image_size, cfg.embed_dim)
    text_encoder = LSTMTextEncoder(vocab_size, cfg.text.embed_dim, cfg.text.hidden_dim, cfg.embed_dim, cfg.text.dropout)
    return TIRG(image_encoder, text_encoder, cfg.embed_dim, cfg.norm_scale)


def save_model(path: Path, model: TIRG, cfg: ModelConfig, vocab_words: list[str], image_size: int) -> None:
    """A self-describing checkpoint: later stages rebuild the model without reading `model` params."""
    from dataclasses import asdict

    from stages.training import save_checkpoint

    save_checkpoint(Path(path), model, {"model_config": asdict(cfg), "vocab": vocab_words, "image_size": image_size})


def load_model(path: Path) -> tuple[TIRG, ModelConfig, list[str], int]:
    """(model in eval mode on the CPU, its config, its vocabulary words, its image size)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (did the stage that writes it run?)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = parse(ModelConfig, "model", state["model_config"], path)
    model = build_model(cfg, len(state["vocab"]) + 1, state["image_size"], load_weights=False)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state["vocab"], state["image_size"]
