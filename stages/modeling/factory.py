"""The `model` section of params.yaml, the function that builds the model it describes (by its entry in
models/registry.py), and the self-describing checkpoint of a trained model.

Every composition model offers the same four calls, which is all the stages use:
    encode_reference(images)   the query side's image representation (a vector, a map, maps or tokens)
    encode_text(tokens, lengths)
    compose(reference, text)   the composed query: a vector, or one vector per level (VAL)
    encode_image(images)       the target / gallery side, in the same form as compose's output
`as_vector` turns a per-level output into one vector whose cosine ranks as the model ranks.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from typing_extensions import Annotated

from models.composed.val import resnet_levels
from models.encoders import LSTMTextEncoder, ResNetEncoder, SmallCNN, SmallCNNMaps, resnet_last_map
from models.registry import MODELS
from stages.common.errors import StageError
from stages.common.params import PARAMS_FILE, ParamsError, parse, require, section

PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]
ModelName = Literal[tuple(MODELS)]  # an unknown model.name is a params error listing these
MATCHING_MODELS = tuple(name for name, entry in MODELS.items() if entry.task == "matching")  # caption <-> image
DEFAULT_MODELS = {"composed": "tirg", "matching": "dual_encoder"}  # model.name: auto
RESNET_DEPTH = {"resnet18": 18, "resnet50": 50}


@section
class ImageConfig:
    encoder: Literal["small_cnn", "resnet18", "resnet50"]
    # the ResNets' ImageNet weights: a torchvision weights name (IMAGENET1K_V1, DEFAULT, ...), fetched once into
    # $TORCH_HOME/hub/checkpoints and read from there offline, or the path of a local state_dict file
    weights: Optional[str]
    channels: list[PositiveInt]

    def __post_init__(self):
        require(self.encoder != "small_cnn" or self.weights is None, "image.weights",
                "only the ResNet encoders load weights")
        require(len(self.channels) > 0, "image.channels", "needs at least one stage")


@section
class TextConfig:
    encoder: Literal["lstm", "minilm"]  # lstm: each method's own LSTM; minilm: frozen all-MiniLM-L6-v2
    embed_dim: PositiveInt              # word vectors (300 with GloVe)
    hidden_dim: PositiveInt
    dropout: Probability


@section
class ComposeAEConfig:
    as_released_conjugate_batch_limit: bool  # the release's fixed 32-row conjugate vector (batch <= 32)


@section
class VALConfig:
    levels: Annotated[int, Field(ge=1, le=3)]  # low, mid, high CNN levels (the paper: 3)
    num_heads: PositiveInt
    attention_dropout: Probability


@section
class AMCConfig:
    router_hidden: PositiveInt
    heads: PositiveInt
    ffn_ratio: Annotated[float, Field(gt=0)]
    layers: PositiveInt
    freeze_trunk_bn: bool


@section
class ModelConfig:
    name: Literal["auto", ModelName]  # auto: the task's default model (DEFAULT_MODELS)
    embed_dim: PositiveInt
    image: ImageConfig
    text: TextConfig
    norm_scale: Annotated[float, Field(gt=0)]
    composeae: ComposeAEConfig
    val: VALConfig
    amc: AMCConfig

    def for_task(self, task: str) -> "ModelConfig":
        """This config with `auto` resolved to the task's default model; a ParamsError when the model cannot do
        `task`. Stages build and save the resolved config, so a checkpoint names its model."""
        resolved = self if self.name != "auto" else dataclasses.replace(self, name=DEFAULT_MODELS[task])
        resolved.check_task(task)
        return resolved

    def check_task(self, task: str) -> None:
        """Raise a ParamsError naming model.name when the model cannot do `task`."""
        if self.name == "auto":
            raise ValueError("model.name auto: resolve it with for_task(task) first")
        if (task == "matching") != (self.name in MATCHING_MODELS):
            kind = "image-text matching" if self.name in MATCHING_MODELS else "composed retrieval"
            raise ParamsError(f"{PARAMS_FILE}: model.name: '{self.name}' is a {kind} model, task is '{task}'")

    def __post_init__(self):
        if self.name == "val":
            require(self.image.encoder != "small_cnn" or self.val.levels <= len(self.image.channels), "val.levels",
                    f"small_cnn has {len(self.image.channels)} stages")
        if self.name == "amc":
            require(self.embed_dim % self.amc.heads == 0, "amc.heads", f"must divide embed_dim {self.embed_dim}")


def as_vector(x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """One vector per row. Per-level outputs become the concatenated unit vectors / √L, so the cosine of two
    such vectors is the mean of the per-level cosines (VAL's ranking, yanbeic/VAL@8d12749 test_val.py)."""
    if isinstance(x, torch.Tensor):
        return x
    return torch.cat([F.normalize(level.float(), dim=-1) for level in x], dim=-1) / len(x) ** 0.5


def zeros_like(x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """A blank reference of the same form (the text_only ablation)."""
    return torch.zeros_like(x) if isinstance(x, torch.Tensor) else [torch.zeros_like(level) for level in x]


WEIGHTS_NAME = re.compile(r"(\w+_Weights\.)?[A-Z][A-Z0-9_]*")  # IMAGENET1K_V1, DEFAULT, ResNet50_Weights.IMAGENET1K_V2


def read_image_weights(cfg: ImageConfig) -> dict[str, torch.Tensor] | None:
    """The state_dict `model.image.weights` names: a torchvision weights name of the encoder (through torchvision's
    own download and cache) or a file."""
    if cfg.weights is None:
        return None
    path = Path(cfg.weights)
    if not WEIGHTS_NAME.fullmatch(cfg.weights) or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"model.image.weights: {path} does not exist")
        return torch.load(path, map_location="cpu", weights_only=True)
    return torchvision_weights(cfg.encoder, cfg.weights)


def torchvision_weights(encoder: str, name: str) -> dict[str, torch.Tensor]:
    """torchvision's `<Encoder>_Weights.<name>` state_dict: from $TORCH_HOME/hub/checkpoints when it was fetched
    before (no network then), else downloaded there once (torchvision checks its hash)."""
    import urllib.error

    import torchvision

    enum = torchvision.models.get_model_weights(encoder)
    member = name.split(".")[-1]
    if member not in enum.__members__:
        raise ParamsError(f"model.image.weights: {name!r} is neither a file nor a weights name of {encoder} "
                          f"(torchvision has {', '.join(enum.__members__)})")
    weights = enum[member]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError) as err:
        raise StageError(f"model.image.weights: {name} is not in the cache ({cached}) and could not be downloaded "
                         f"from {weights.url} ({err}); fetch it once with a network, or name a local file") from None


class Parts:
    """The encoders the `model` section describes, handed to a model's `build(parts)` (models/registry.py).

    Each call builds fresh modules; a model's `build` calls them in the order its parameters are created."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, image_size: int, weights: dict[str, torch.Tensor] | None):
        self.cfg, self.vocab_size, self.image_size, self.weights = cfg, vocab_size, image_size, weights
        self.embed_dim, self.norm_scale = cfg.embed_dim, cfg.norm_scale

    def text_encoder(self, out_dim: int | None, own_lstm: Callable[[TextConfig], nn.Module] | None = None,
                     words_and_sentence: bool = False) -> nn.Module:
        """`model.text.encoder`: minilm, or the LSTM (the model's own `own_lstm(text_cfg)`, else TIRG's).
        `words_and_sentence`: MiniLM returns (word features, sentence vector), as AMC's own LSTM does.
        out_dim None: MiniLM's frozen 384-d features with no trainable projection (ComposeAE)."""
        t = self.cfg.text
        if t.encoder == "minilm":
            from stages.modeling.text import minilm_text_encoder

            return minilm_text_encoder(out_dim, amc_pair=words_and_sentence)
        if own_lstm is not None:
            return own_lstm(t)
        return LSTMTextEncoder(self.vocab_size, t.embed_dim, t.hidden_dim, out_dim, t.dropout)

    def vector_encoder(self) -> nn.Module:
        """images -> B x embed_dim."""
        if self.cfg.image.encoder == "small_cnn":
            return SmallCNN(self.cfg.image.channels, self.image_size, self.embed_dim)
        return ResNetEncoder(self.embed_dim, self.weights, RESNET_DEPTH[self.cfg.image.encoder])

    def map_trunk(self, levels: int) -> tuple[nn.Module, list[int]]:
        """A trunk returning the last `levels` maps (a list), and their channels."""
        if self.cfg.image.encoder == "small_cnn":
            trunk = SmallCNNMaps(self.cfg.image.channels, levels)
            return trunk, trunk.channels
        trunk, channels = resnet_levels(RESNET_DEPTH[self.cfg.image.encoder], self.weights)
        return _LastLevels(trunk, levels), channels[-levels:]

    def last_map_trunk(self) -> tuple[nn.Module, int]:
        """A trunk returning the last map (B x C x h x w), and C."""
        if self.cfg.image.encoder == "small_cnn":
            trunk = SmallCNNMaps(self.cfg.image.channels, 1)
            return _LastMap(trunk), trunk.channels[-1]
        return resnet_last_map(RESNET_DEPTH[self.cfg.image.encoder], self.weights)


class _LastLevels(nn.Module):
    def __init__(self, trunk: nn.Module, levels: int):
        super().__init__()
        self.trunk, self.levels = trunk, levels

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.trunk(images)[-self.levels:]


class _LastMap(nn.Module):
    """The single (last) map of a list-returning trunk."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)[-1]


def build_model(cfg: ModelConfig, vocab_size: int, image_size: int, load_weights: bool = True,
                word_vectors: torch.Tensor | None = None) -> nn.Module:
    """A freshly initialised model. `model.image.weights` is read from local disk; `word_vectors`
    (vocab_size x text.embed_dim, e.g. GloVe rows) initialise the word embedding of the LSTM encoders."""
    if cfg.name == "auto":
        raise ValueError("model.name auto: resolve it with ModelConfig.for_task(task) before building")
    weights = read_image_weights(cfg.image) if load_weights else None
    model = MODELS[cfg.name].build(Parts(cfg, vocab_size, image_size, weights))
    if word_vectors is not None:
        _load_word_vectors(model.text_encoder, word_vectors, cfg)
    return model


def _load_word_vectors(text_encoder: nn.Module, vectors: torch.Tensor, cfg: ModelConfig) -> None:
    embedding = getattr(text_encoder, "embedding", None)
    if embedding is None:
        raise ValueError(f"model.text.encoder: {cfg.text.encoder} has no word embedding to initialise")
    if tuple(vectors.shape) != tuple(embedding.weight.shape):
        raise ValueError(f"word vectors {tuple(vectors.shape)} do not fit the embedding "
                         f"{tuple(embedding.weight.shape)} (model.text.embed_dim must equal vocabulary.glove_dim)")
    with torch.no_grad():
        embedding.weight.copy_(vectors)


def save_model(path: Path, model: nn.Module, cfg: ModelConfig, text_state, image_size: int) -> None:
    """A self-describing checkpoint: later stages rebuild the model without reading `model` params."""
    from stages.common.checkpoints import save_checkpoint

    save_checkpoint(Path(path), model, {"model_config": asdict(cfg), "vocab": text_state, "image_size": image_size})


def load_model(path: Path) -> tuple[nn.Module, ModelConfig, object, int]:
    """(model in eval mode on the CPU, its config, its text tokenizer state, its image size)."""
    from stages.modeling.text import tokenizer_from_state

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (did the stage that writes it run?)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = parse(ModelConfig, "model", state["model_config"], path)
    tokenizer = tokenizer_from_state(state["vocab"])
    model = build_model(cfg, len(tokenizer), state["image_size"], load_weights=False)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, state["vocab"], state["image_size"]
