"""VAL equals its release (yanbeic/VAL@8d12749, TensorFlow 1.10 code run in TF 2.14's compat.v1 graph mode) on the
same weights and inputs: tests/known_answers/val/ (record.py wrote expected.pt; PROVENANCE.md says how).

Compared from the trunk's maps on (the release's slim ResNet-v2-50 is not cirflow's trunk): the text model
(embedding, LSTM with learned initial state, max-pool, dropout, projection + BN), the three composite transformers,
the per-level descriptors, the bidirectional semi-hard matching loss, the gradients of every parameter and of the
maps, the BatchNorm moving averages, the release's L2 term and the inference features. Rows of issue 24's table
for VAL are measured here as well: the sentence vector's max-pool over the padded batch, L2 on the slim convs
only, BN decay 0.997, the LSTM's forget bias and initial state.
"""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from models.losses.val import bidirectional_matching_loss
from known_answers.layouts import LAYOUTS
from known_answers.layouts.val import VAL_LAYOUT, comparable_state, from_tf_variables, tf_variables

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

HERE = Path(__file__).resolve().parent / "known_answers" / "val"
_spec = importlib.util.spec_from_file_location("val_known_answer_case", HERE / "case.py")
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)
INPUTS = C.load_inputs()
EXPECTED = torch.load(HERE / "expected.pt", weights_only=True)
# the release's gradients and moving averages are stored in its own variable names; the layout names them here
for _case in EXPECTED["release"].values():
    for _key in ("grads", "total_grads", "moving"):
        if _key in _case:
            _case[_key] = C.in_cirflow_names(_case[_key])
RTOL, ATOL = 1e-4, 1e-5
WEIGHT_DECAY = 4e-5  # train_val.py --weight_decay default, the slim arg scopes' l2_regularizer


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def close(actual, expected, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def check_inputs(model):
    """The trunk maps cirflow computes now are the ones the release read (else a failure below is an input
    drift, not a formula change)."""
    train_ref, train_tgt = C.trunk_maps(C.build_model(INPUTS), INPUTS, train=True)
    for name, maps in (("train_reference", train_ref), ("train_target", train_tgt)):
        sums = torch.tensor([[m.sum().item(), m.abs().sum().item()] for m in maps])
        close(sums, EXPECTED["maps_checksum"][name], f"trunk maps {name} (inputs drifted)", rtol=1e-5, atol=1e-4)


def check_step(step, release, what):
    close(step.sentence, release["sentence"], f"{what}: sentence vector (LSTM max-pool)")
    close(step.text, release["text"], f"{what}: text feature (projection + BN)")
    for level in range(len(step.query)):
        close(step.composite[level], release["composite"][level], f"{what}: composite map y level {level}")
        close(step.query[level], release["query"][level], f"{what}: query f level {level}")
        close(step.target[level], release["target"][level], f"{what}: target g level {level}")
        loss = bidirectional_matching_loss(step.query[level], step.target[level], INPUTS["loss"]["val_margin"],
                                           True, INPUTS["loss"]["val_semi_hard_mode"])
        close(loss, release["level_losses"][level], f"{what}: loss of level {level}")
        for side in ("reference", "target"):
            close(step.map_grads[side][level], release["map_grads"][side][level], f"{what}: d loss / d {side} map {level}")
    close(step.loss, release["matching"], f"{what}: loss")
    assert set(step.grads) == set(release["grads"])
    for name, grad in release["grads"].items():
        close(step.grads[name], grad, f"{what}: d loss / d {name}")


def test_known_answer_val_layout_round_trips_and_names_the_release_variables():
    model = C.build_model(INPUTS)
    state = comparable_state(model.state_dict())
    assert LAYOUTS["val"] is VAL_LAYOUT
    release = VAL_LAYOUT.release_state(state)
    back = VAL_LAYOUT.cirflow_state(release)
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key
    # the joined TF variables are exactly the release graph's model variables (record.py asserted it there)
    variables = tf_variables(release)
    assert sorted(variables) == sorted(EXPECTED["release_variables"]) == sorted(EXPECTED["release_weights"])
    for name, value in EXPECTED["release_weights"].items():  # the values that gave the release's recorded answers
        close(variables[name].detach(), value, f"exported {name}", rtol=1e-6, atol=1e-7)
    # and a TF checkpoint's variables come back to a model that computes the same LSTM
    split = VAL_LAYOUT.cirflow_state(from_tf_variables(variables))
    for key in state:
        if "lstm.bias" not in key:
            assert torch.equal(split[key], state[key]), key
    lstm = "text_encoder.lstm."
    close(split[lstm + "bias_ih_l0"] + split[lstm + "bias_hh_l0"], state[lstm + "bias_ih_l0"] + state[lstm + "bias_hh_l0"],
          "b_ih + b_hh through the TF bias", rtol=0, atol=1e-6)
    with pytest.raises(KeyError, match="lacks 'transformers.0.w_self'"):
        VAL_LAYOUT.release_state({k: v for k, v in state.items() if k != "transformers.0.w_self"})


def test_known_answer_val_training_step_full_captions():
    """Captions of equal length (no padding): cirflow as it is, through training_loss, equals the release."""
    model = C.build_model(INPUTS)
    check_inputs(model)
    step = C.training_step(model, INPUTS, "full")
    check_step(step, EXPECTED["release"]["full"], "full")


def test_known_answer_val_training_step_padded_captions_with_the_release_pooling():
    """Captions of lengths 6, 3, 5, 2, 4, 1: with the text max-pool swapped for the release's (zeros past each
    caption's end count) every tensor equals the release's; with cirflow's own (valid steps only) the sentence
    vectors and everything after them differ: issue 24's first VAL row, measured."""
    release = EXPECTED["release"]["padded"]
    check_step(C.training_step(C.build_model(INPUTS), INPUTS, "padded", release_pooling=True), release, "padded")
    own = C.training_step(C.build_model(INPUTS), INPUTS, "padded")
    ids, lengths = C.tokens(INPUTS, "padded")
    for row, n in enumerate(lengths.tolist()):  # tf.nn.dynamic_rnn's outputs past each caption's end are zeros
        assert torch.count_nonzero(release["lstm_outputs"][row, n:]) == 0
        assert torch.count_nonzero(release["lstm_outputs"][row, :n]) > 0
    short = lengths < lengths.max()
    assert torch.allclose(own.sentence[~short], release["sentence"][~short], atol=ATOL)  # full-length rows agree
    gap = (own.sentence - release["sentence"]).abs()
    assert gap[short].max() > 0.1  # short captions: units whose valid outputs are all < 0 become 0 in the release
    # the release's vector is cirflow's lifted at 0 where the caption is padded: max(valid max, 0)
    close(release["sentence"][short], own.sentence[short].clamp(min=0), "padded rule = max(valid max, 0)")
    assert abs(own.loss.item() - release["matching"].item()) > 1e-3


def test_known_answer_val_inference_features():
    """extract_features_val.py: eval mode (moving statistics), one query at a time, its caption unpadded."""
    for case in INPUTS["cases"]:
        features = C.eval_features(C.build_model(INPUTS), INPUTS, case)
        for level, f in enumerate(features):
            close(f, EXPECTED["release"][case]["eval_query"][level], f"{case}: eval query level {level}")


def test_known_answer_val_batchnorm_moving_averages_follow_decay_0997():
    """slim batch_norm decay 0.997 (resnet_utils.py resnet_arg_scope) is PyTorch momentum 0.003; cirflow's BN keep
    PyTorch's 0.1. Both update with the unbiased batch variance."""
    release = EXPECTED["release"]["full"]["moving"]
    model = C.build_model(INPUTS)
    C.training_step(model, INPUTS, "full")
    state = model.state_dict()
    off = max((state[k] - v).abs().max().item() for k, v in release.items())
    assert off > 0.05  # momentum 0.1: 33x the release's step
    model = C.build_model(INPUTS)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            assert module.momentum == pytest.approx(0.1)
            module.momentum = 1 - 0.997
    C.training_step(model, INPUTS, "full")
    state = model.state_dict()
    assert len(release) == 2 * 13  # 4 slim convs x 3 levels + the text projection, mean and variance each
    for name, value in release.items():
        close(state[name], value, f"{name} after one step at momentum 0.003")


def test_known_answer_val_l2_only_on_slim_conv_weights():
    """The release adds weight_decay/2 ‖w‖² (slim l2_regularizer) of the slim conv weights only to its loss
    (train_val.py l.128-129); cirflow's Adam weight_decay 4e-5 adds 4e-5 p to the gradient of every parameter."""
    release = EXPECTED["release"]["full"]
    model = C.build_model(INPUTS)
    params = dict(model.named_parameters())
    convs = sorted(k for k, p in params.items() if not k.startswith("trunk.") and p.dim() == 4
                   or k == "text_encoder.project.weight")
    ours = {theirs: k for k, theirs in VAL_LAYOUT.names.items()}
    assert sorted(ours[k] for k in EXPECTED["regularized"]) == convs
    reg = sum(WEIGHT_DECAY / 2 * params[k].detach().pow(2).sum() for k in convs)
    close(reg, release["reg"], "the release's L2 term")
    for name, total in release["total_grads"].items():
        decay = WEIGHT_DECAY * params[name].detach() if name in convs else 0 * total
        close(total - release["grads"][name], decay, f"L2 gradient of {name}", rtol=1e-3, atol=1e-8)
    not_in_release = sorted(k for k in release["grads"] if k not in convs)
    assert "text_encoder.lstm.weight_ih_l0" in not_in_release and "transformers.0.w_self" in not_in_release
    assert (len(release["grads"]), len(convs), len(not_in_release)) == (70, 13, 57)  # 57 decayed by cirflow only
    # (the LSTM, embedding, initial state, attention projections, BN gamma/beta, w_j, w_s)


def test_known_answer_val_lstm_forget_bias_and_learned_initial_state():
    """BasicLSTMCell adds forget_bias 1.0 inside the cell (the layout's tf_variables subtracts it from the
    exported bias): cirflow's weights run uncompensated in the release equal cirflow with b_f + 1. The release's
    learned initial state (glorot-initialised; cirflow's starts at 0) enters as c = init_state_0, h = init_state_1."""
    variants = EXPECTED["variants"]
    ids, lengths = C.tokens(INPUTS, "full")
    model = C.build_model(INPUTS).train()
    hidden = model.text_encoder.h0.shape[-1]
    base = C.sentence_vector(model, ids, lengths)
    with torch.no_grad():
        model.text_encoder.lstm.bias_ih_l0[hidden:2 * hidden] += 1.0  # PyTorch gate order (i, f, g, o)
    close(C.sentence_vector(model, ids, lengths), variants["forget_bias_uncompensated_sentence"], "b_f + 1")
    assert (base - variants["forget_bias_uncompensated_sentence"]).abs().max() > 0.05
    model = C.build_model(INPUTS).train()
    for c, h, name in ((torch.zeros(hidden), torch.zeros(hidden), "zero_initial_state_sentence"),
                       (variants["release_init_state_0"], variants["release_init_state_1"],
                        "release_initial_state_sentence")):
        with torch.no_grad():
            model.text_encoder.c0.copy_(c.reshape(1, 1, -1))
            model.text_encoder.h0.copy_(h.reshape(1, 1, -1))
        close(C.sentence_vector(model, ids, lengths), variants[name], name)
    limit = (6 / (2 * hidden)) ** 0.5  # glorot uniform on a vector of H: fan_in = fan_out = H
    for i in (0, 1):
        state = variants[f"release_init_state_{i}"]
        assert state.abs().max() <= limit and state.abs().max() > limit / 2 and state.std() > 0.1


def test_known_answer_val_semi_hard_negatives_as_released():
    """The release's tf.less(d_all, d_pos) broadcasts d⁺ over the last axis (d_ij < d⁺_j, model.py l.131, 148):
    cirflow's semi_hard_mode 'as_released' reproduces it; its default 'row' (params.yaml) does not, here."""
    release = EXPECTED["release"]["full"]
    step = C.training_step(C.build_model(INPUTS), INPUTS, "full", semi_hard_mode="row")
    assert abs(step.loss.item() - release["matching"].item()) > 1e-3
