"""VAL's released parameter layout (yanbeic/VAL@8d12749, TensorFlow 1.10 + slim): cirflow's text encoder and
composite transformers in the release's TF variable names (without the ':0').

The release's names, from its graph (train_val.py `_build_model`):

    RNN/token_embedding_weights                      word embedding, vocab x word_dim (nets/rnn.py l.112-119)
    RNN/bidirectional_lstm/forward/init_state_{0,1}  learned initial state c, h (LSTMStateTuple order; rnn.py l.20-50)
    RNN/bidirectional_lstm/rnn/basic_lstm_cell/{kernel,bias}
                                                     BasicLSTMCell: kernel (word_dim + H) x 4H, gates (i, j, f, o)
    projection/text/weights, projection/text/BatchNorm/*
                                                     slim 1x1 conv + BN, no activation (nets/projection.py l.16)
    attention{l}/Conv   /weights, /BatchNorm/*       fusion conv              (nets/attention.py l.45)
    attention{l}/Conv_1 ...                          channel gate on GAP(v)   (l.49)
    attention{l}/Conv_2 ...                          spatial gate, full-map kernel (l.53)
    attention{l}/dense{,_1,...,_5}/kernel            per head h: keys = dense_{3h}, values = dense_{3h+1},
                                                     queries = dense_{3h+2} (l.15-17, heads in order, l.61-62)
    attention{l}/Conv_3 ...                          conv after concatenating the heads (l.65)
    attention{l}/r_weight, attention{l}/weight       w_j, w_s (l.68-69)

Storage differences (the `to_release` / `to_cirflow` functions):
  * conv kernels: TF HWIO, torch OIHW; cirflow's text projection is a Linear (out x in), the release's a 1x1 conv;
    tf.layers.dense kernels are in x out (torch Linear: out x in);
  * the release computes softmax(keys valuesᵀ) queries, cirflow softmax(Q Kᵀ) V: cirflow's query / key / value
    projections are the release's keys / values / queries;
  * LSTM: TF holds one kernel [W_ih; W_hh]ᵀ and one bias with the gates in the order (i, j=g, f, o) (PyTorch:
    (i, f, g, o)), and BasicLSTMCell adds forget_bias = 1.0 to the forget gate inside the cell. The layout keeps
    cirflow's four LSTM tensors as four release entries, named `<TF variable>#<part>` (`kernel#input`,
    `kernel#hidden`, `bias#ih`, `bias#hh`), each a pure reordering, so the name map round-trips exactly;
    `tf_variables` joins them into the two TF variables (kernel rows stacked; bias = ih + hh − 1.0 on the forget
    block) and `from_tf_variables` splits a TF checkpoint's variables back (bias + 1.0 on the forget block into
    `bias#ih`, zeros into `bias#hh`);
  * the learned initial state: TF vectors of H, cirflow 1 x 1 x H parameters.

Not in the layout: the image trunk (`trunk.*`: the release's slim ResNet-v2-50 / MobileNet-v1 is a different
network from cirflow's torchvision ResNet-v1 / small CNN, models/composed/val.py ResNetLevels) and BatchNorm's
`num_batches_tracked` (no TF counterpart). `comparable_state` drops both from a cirflow state_dict.
The release fixes 2 heads (attention.py l.58); the layout is for its 3 levels.
"""
from __future__ import annotations

import torch

from known_answers.layouts import ReleaseLayout, register

VAL_RELEASE = "yanbeic/VAL@8d1274915a287df730f04b04d3810d1c38bc6e9e"
LEVELS, HEADS = 3, 2
FORGET_BIAS = 1.0  # tf.nn.rnn_cell.BasicLSTMCell's default, added to the forget gate inside the cell
LSTM = "RNN/bidirectional_lstm/rnn/basic_lstm_cell"
_BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def _gates(x: torch.Tensor) -> torch.Tensor:
    """Swap the 2nd and 3rd gate blocks along dim 0: PyTorch (i, f, g, o) <-> TF (i, g, f, o); its own inverse."""
    i, a, b, o = x.chunk(4, dim=0)
    return torch.cat([i, b, a, o], dim=0)


def _oihw_to_hwio(w):
    return w.permute(2, 3, 1, 0)


def _hwio_to_oihw(w):
    return w.permute(3, 2, 0, 1)


def _linear_to_conv1x1(w):
    return w.T[None, None]


def _conv1x1_to_linear(w):
    return w[0, 0].T


def _transpose(w):
    return w.T


def _to_tf_gates_t(w):
    return _gates(w).T


def _from_tf_gates_t(w):
    return _gates(w.T)


def _state_to_release(s):
    return s.reshape(-1)


def _state_to_cirflow(s):
    return s.reshape(1, 1, -1)


def _slim_conv(ours: str, theirs: str, names: dict, to_r: dict, to_c: dict) -> None:
    names[f"{ours}.0.weight"] = f"{theirs}/weights"
    to_r[f"{ours}.0.weight"], to_c[f"{ours}.0.weight"] = _oihw_to_hwio, _hwio_to_oihw
    for suffix, tf_name in _BN.items():
        names[f"{ours}.1.{suffix}"] = f"{theirs}/BatchNorm/{tf_name}"


def _layout() -> ReleaseLayout:
    names: dict[str, str] = {
        "text_encoder.embedding.weight": "RNN/token_embedding_weights",
        "text_encoder.c0": "RNN/bidirectional_lstm/forward/init_state_0",
        "text_encoder.h0": "RNN/bidirectional_lstm/forward/init_state_1",
        "text_encoder.lstm.weight_ih_l0": f"{LSTM}/kernel#input",
        "text_encoder.lstm.weight_hh_l0": f"{LSTM}/kernel#hidden",
        "text_encoder.lstm.bias_ih_l0": f"{LSTM}/bias#ih",
        "text_encoder.lstm.bias_hh_l0": f"{LSTM}/bias#hh",
        "text_encoder.project.weight": "projection/text/weights",
        **{f"text_encoder.norm.{k}": f"projection/text/BatchNorm/{v}" for k, v in _BN.items()},
    }
    to_r = {"text_encoder.c0": _state_to_release, "text_encoder.h0": _state_to_release,
            "text_encoder.lstm.weight_ih_l0": _to_tf_gates_t, "text_encoder.lstm.weight_hh_l0": _to_tf_gates_t,
            "text_encoder.lstm.bias_ih_l0": _gates, "text_encoder.lstm.bias_hh_l0": _gates,
            "text_encoder.project.weight": _linear_to_conv1x1}
    to_c = {"text_encoder.c0": _state_to_cirflow, "text_encoder.h0": _state_to_cirflow,
            "text_encoder.lstm.weight_ih_l0": _from_tf_gates_t, "text_encoder.lstm.weight_hh_l0": _from_tf_gates_t,
            "text_encoder.lstm.bias_ih_l0": _gates, "text_encoder.lstm.bias_hh_l0": _gates,
            "text_encoder.project.weight": _conv1x1_to_linear}
    for level in range(LEVELS):
        ours, theirs = f"transformers.{level}", f"attention{level}"
        for module, conv in (("fuse", "Conv"), ("channel_gate", "Conv_1"), ("spatial_gate", "Conv_2"),
                             ("merge", "Conv_3")):
            _slim_conv(f"{ours}.{module}", f"{theirs}/{conv}", names, to_r, to_c)
        for head in range(HEADS):
            for offset, projection in enumerate(("query", "key", "value")):  # the release's keys, values, queries
                index = 3 * head + offset
                key = f"{ours}.{projection}.{head}.weight"
                names[key] = f"{theirs}/dense{f'_{index}' if index else ''}/kernel"
                to_r[key], to_c[key] = _transpose, _transpose
        names[f"{ours}.w_joint"] = f"{theirs}/r_weight"
        names[f"{ours}.w_self"] = f"{theirs}/weight"
    return ReleaseLayout(name="val", repository=VAL_RELEASE, names=names, to_release=to_r, to_cirflow=to_c)


VAL_LAYOUT = register(_layout())


def comparable_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cirflow's state_dict without what the release has no counterpart for: the image trunk and BatchNorm's
    num_batches_tracked."""
    return {k: v for k, v in state.items() if not k.startswith("trunk.") and not k.endswith("num_batches_tracked")}


def tf_variables(release_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layout's release entries as the release's TF variables: the LSTM parts joined into BasicLSTMCell's
    kernel ([input rows; hidden rows]) and bias (ih + hh − forget_bias on the forget block, since the cell adds
    forget_bias itself)."""
    out = {k: v for k, v in release_state.items() if "#" not in k}
    out[f"{LSTM}/kernel"] = torch.cat([release_state[f"{LSTM}/kernel#input"], release_state[f"{LSTM}/kernel#hidden"]])
    bias = release_state[f"{LSTM}/bias#ih"] + release_state[f"{LSTM}/bias#hh"]
    out[f"{LSTM}/bias"] = bias - FORGET_BIAS * _forget_block(bias)
    return out


def from_tf_variables(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's TF variables (e.g. read from its checkpoint) as the layout's release entries: the inverse of
    `tf_variables`, with the whole bias (+ forget_bias on the forget block) in `bias#ih` and zeros in `bias#hh`."""
    out = {k: v for k, v in variables.items() if k not in (f"{LSTM}/kernel", f"{LSTM}/bias")}
    bias = variables[f"{LSTM}/bias"]
    hidden = bias.shape[0] // 4
    kernel = variables[f"{LSTM}/kernel"]
    out[f"{LSTM}/kernel#input"], out[f"{LSTM}/kernel#hidden"] = kernel[:-hidden], kernel[-hidden:]
    out[f"{LSTM}/bias#ih"] = bias + FORGET_BIAS * _forget_block(bias)
    out[f"{LSTM}/bias#hh"] = torch.zeros_like(bias)
    return out


def _forget_block(bias: torch.Tensor) -> torch.Tensor:
    """1 on the forget gate's block of a TF-ordered (i, j, f, o) gate vector, 0 elsewhere."""
    hidden = bias.shape[0] // 4
    mask = torch.zeros_like(bias)
    mask[2 * hidden:3 * hidden] = 1
    return mask
