"""Record VAL's known answer from the released TensorFlow code (yanbeic/VAL@8d12749) on cirflow's weights.

Run with cirflow's venv (torch); it starts the TensorFlow side (numpy + tensorflow only) in a second interpreter:

    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python tests/known_answers/val/record.py \\
        --release /work/releases/VAL --tf-python /work/releases/venv-val/bin/python

cirflow side: inputs.json (from DEFAULT_INPUTS), the model (case.build_model), its weights in the release's TF
variable names (tests/known_answers/layouts/val.py: VAL_LAYOUT, tf_variables), the trunk's maps, token ids, dropout
masks -> .npz files in a temporary folder. TF side (`--tf-side`): builds the release's graph in compat.v1 graph mode
from the release's own functions -- train_val.py `_build_model` (read from the file and executed as written) for
training, extract_features_val.py `_image_modify_model` for inference -- with `image_model_ml` (its slim
ResNet-v2-50) replaced by placeholders for cirflow's trunk maps and slim.dropout by the same keep-mask dropout as
cirflow's side uses; loads the weights, runs, writes the results. The cirflow side converts them back to cirflow's
names and layout (NCHW, the layout's to_cirflow) and writes expected.pt.
"""
from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
RELEASE = "yanbeic/VAL@8d1274915a287df730f04b04d3810d1c38bc6e9e"
LSTM = "RNN/bidirectional_lstm/rnn/basic_lstm_cell"

DEFAULT_INPUTS = {
    "method": "val",
    "release": RELEASE,
    "model": {"name": "val", "embed_dim": 8,
              "image": {"encoder": "small_cnn", "weights": None, "channels": [4, 6, 8]},
              "text": {"encoder": "lstm", "embed_dim": 6, "hidden_dim": 10, "dropout": 0.1},
              "val": {"levels": 3, "num_heads": 2, "attention_dropout": 0.1}},
    "loss": {"name": "val_matching", "val_margin": 0.2, "val_semi_hard_mode": "as_released"},
    "vocab_size": 20, "image_size": 24, "batch_size": 6,
    "weights_seed": 0, "tweak_seed": 1, "w_self": 0.5, "image_seed": 2, "token_seed": 3, "dropout_seed": 4,
    "dropout_rate": 0.1, "tf_seed": 5,
    "cases": {"full": {"lengths": [6, 6, 6, 6, 6, 6]}, "padded": {"lengths": [6, 3, 5, 2, 4, 1]}},
    "how": "torch.manual_seed(weights_seed) then stages.modeling.factory.build_model(model, vocab_size, image_size, "
           "load_weights=False); then, from a generator seeded tweak_seed, each non-trunk BatchNorm's weight = "
           "1 + 0.2 randn, bias = 0.2 randn, running_mean = 0.3 randn, running_var = 0.5 + rand, h0 and c0 = "
           "0.3 randn, and w_self = 0.5 on every level (case.build_model). Reference then target images = randn(B, "
           "3, S, S) from one generator seeded image_seed, through cirflow's small-CNN trunk (train mode, reference "
           "pass then target pass; eval mode for inference) -> the maps both sides read. Token ids randint(1, "
           "vocab) from token_seed, zeroed past each case's lengths. Dropout keep-masks bernoulli(1 - "
           "dropout_rate) from dropout_seed + case index: text (B x hidden), then per level one B x N x N per head. "
           "tf_seed: the TF graph seed of the release's own initial values (the learned initial state draws).",
    # the release's flags (train_val.py l.16-67) as scripts/run_fashion_iq_val.sh sets them, sizes made tiny
    "release_flags": {"image_model": "resnet_v2_50_ml", "text_model": "lstm", "margin": 0.2, "semi_hard": True,
                      "weight_decay": 4e-5, "text_projection_dropout": 0.9, "is_training": True,
                      "word_embedding_size": 6, "text_embedding_size": 10, "joint_embedding_size": 8,
                      "word_embedding_dir": None},
}


def _key(name: str) -> str:
    return name.replace("/", "%2F")


def _unkey(name: str) -> str:
    return name.replace("%2F", "/")


# ------------------------------------------------------------------------------------------- the TensorFlow side
def _release_function(path: Path, name: str, namespace: dict):
    """The release's function `name` from `path`, executed as written in `namespace` (the module's other
    statements -- its imports of the data pipeline, tf.contrib.data -- are not run)."""
    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def _release_flag_definitions(path: Path, tf) -> None:
    """Run the tf.app.flags.DEFINE_* statements of the release's script (its flags and their defaults)."""
    tree = ast.parse(path.read_text())
    nodes = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
             and ast.unparse(n.value.func).startswith("tf.app.flags.DEFINE_")]
    skipped = []
    for node in nodes:  # one at a time: l.82-83 DEFINE_string('dataset', "fashion_iq or shoes") has no help
        try:            # argument, which absl (tf.app.flags since TF 1.5) requires: TypeError; the flag is unused here
            exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), {"tf": tf})
        except TypeError:
            skipped.append(node.lineno)
    assert skipped == [82], skipped


def tf_side(release: Path, work: Path) -> None:
    import importlib
    import os

    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # plain Eigen kernels: no oneDNN reordering of sums
    import keras.src.legacy_tf_layers as legacy_layers
    import tensorflow.compat.v1 as tf

    # tf_slim 1.1.0 reaches the legacy layers through tensorflow.python.layers, whose lazy loader names
    # keras.legacy_tf_layers; keras 2.14 keeps them in keras.src.legacy_tf_layers (an environment alias, no change
    # to the release or to the layers)
    sys.modules["keras.legacy_tf_layers"] = legacy_layers
    for sub in ("base", "core", "convolutional", "normalization", "pooling"):
        sys.modules[f"keras.legacy_tf_layers.{sub}"] = importlib.import_module(f"keras.src.legacy_tf_layers.{sub}")
    import tf_slim

    tf.disable_eager_execution()
    sys.path.insert(0, str(release))
    inputs = json.loads((work / "inputs.json").read_text())
    arrays = dict(np.load(work / "cirflow.npz"))
    weights = {_unkey(k): v for k, v in np.load(work / "weights.npz").items()}

    # slim.dropout -> the same keep-masks as cirflow's side: x * mask / keep_prob (what tf.nn.dropout computes for
    # the kept units); identity when not training, as slim.dropout is
    dropout_calls: list = []

    @tf_slim.add_arg_scope
    def mask_dropout(inputs_, keep_prob=0.5, noise_shape=None, is_training=True, outputs_collections=None,
                     scope=None, seed=None):
        if not is_training:
            return inputs_
        mask = tf.placeholder(tf.float32, inputs_.get_shape().as_list())
        dropout_calls.append((tf.get_variable_scope().name, keep_prob, mask))
        return inputs_ * mask / keep_prob

    tf_slim.dropout = mask_dropout
    import model as release_model  # the release's model.py (patched imports only, see PROVENANCE.md)

    FLAGS = release_model.FLAGS
    _release_flag_definitions(release / "train_val.py", tf)
    FLAGS(["record"])
    for name, value in inputs["release_flags"].items():
        setattr(FLAGS, name, value)

    b, levels = inputs["batch_size"], inputs["model"]["val"]["levels"]
    map_shapes = [tuple(arrays[f"train_reference_{i}"].shape) for i in range(levels)]  # NCHW
    results: dict[str, np.ndarray] = {}

    def nhwc(x):
        return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))

    def assign_all(sess, graph_vars):
        """Every model variable from cirflow's weights; the two sets must be equal (the layout's names are the
        release's)."""
        model_vars = {v.op.name: v for v in graph_vars if not v.op.name.endswith("/avg")}  # not the loss EMAs
        missing, extra = sorted(set(model_vars) - set(weights)), sorted(set(weights) - set(model_vars))
        assert not missing and not extra, f"release variables without a cirflow weight {missing}; unused {extra}"
        for name, var in model_vars.items():
            assert tuple(var.shape.as_list()) == weights[name].shape, (name, var.shape, weights[name].shape)
            var.load(weights[name], sess)
        return model_vars

    # ---------------------------------------------------------------------------------------- training graph
    FLAGS.batch_size, FLAGS.is_training = b, True
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(inputs["tf_seed"])
        maps = {side: [tf.placeholder(tf.float32, (s[0], s[2], s[3], s[1])) for s in map_shapes]
                for side in ("reference", "target")}
        captured: dict = {"composite": [], "pairs": []}
        ns = dict(vars(release_model))

        def image_model_ml(images):  # the release's slim ResNet-v2-50 levels -> cirflow's trunk maps
            return maps[images]

        def text_model(*args, **kwargs):
            captured["lstm"] = release_model.text_model(*args, **kwargs)
            return captured["lstm"]

        def projection_layer(*args, **kwargs):
            captured["text"] = release_model.projection_layer(*args, **kwargs)
            return captured["text"]

        def attention_layer(*args, **kwargs):
            captured["composite"].append(release_model.attention_layer(*args, **kwargs))
            return captured["composite"][-1]

        def bidirectional_matching_loss(f, g, *args, **kwargs):
            captured["pairs"].append((release_model.normalization(f), release_model.normalization(g)))
            return release_model.bidirectional_matching_loss(f, g, *args, **kwargs)

        ns.update(image_model_ml=image_model_ml, text_model=text_model, projection_layer=projection_layer,
                  attention_layer=attention_layer, bidirectional_matching_loss=bidirectional_matching_loss)
        build = _release_function(release / "train_val.py", "_build_model", ns)
        texts = tf.placeholder(tf.int32, shape=(b, None))
        seqlengths = tf.placeholder(tf.int32, shape=(b,))
        with tf.variable_scope(tf.get_variable_scope()):  # as train_val.py main() l.194-195
            total_loss, losses = build("reference", "target", texts, seqlengths, inputs["vocab_size"])
        matching = tf.add_n(losses)
        reg_losses = tf.get_collection(tf.GraphKeys.REGULARIZATION_LOSSES)

        def source_variables(tensor):  # the variables a regularization term reads
            seen, stack, found = set(), [tensor.op], set()
            while stack:
                op = stack.pop()
                if op.name in seen:
                    continue
                seen.add(op.name)
                if op.type in ("VarHandleOp", "VariableV2"):
                    found.add(op.name)
                stack.extend(t.op for t in op.inputs)
            return found

        regularized = sorted(set().union(*(source_variables(r) for r in reg_losses)))
        reg = tf.add_n(reg_losses)
        train_vars = [v for v in tf.trainable_variables() if "ogits" not in v.name]  # as train_val.py l.200
        dense = lambda gs: [g if g is None else tf.convert_to_tensor(g) for g in gs]  # the embedding's IndexedSlices
        grads = dense(tf.gradients(matching, train_vars + maps["reference"] + maps["target"]))
        total_grads = dense(tf.gradients(total_loss, train_vars))
        sentence = tf.squeeze(captured["lstm"], [1, 2])
        lstm_outputs = graph.get_tensor_by_name("RNN/bidirectional_lstm/mean_states:0").op.inputs[0]
        update_ops = tf.get_collection(tf.GraphKeys.UPDATE_OPS)
        moving = [v for v in tf.global_variables() if "moving_" in v.op.name]
        expected_calls = ["projection"] + [f"attention{i}" for i in range(levels) for _ in range(2)]
        assert [c[0] for c in dropout_calls] == expected_calls, dropout_calls
        assert all(abs(c[1] - (1 - inputs["dropout_rate"])) < 1e-12 for c in dropout_calls), dropout_calls
        state_vars = {v.op.name: v for v in tf.global_variables() if "init_state_" in v.op.name}

        with tf.Session(graph=graph, config=tf.ConfigProto(intra_op_parallelism_threads=1,
                                                          inter_op_parallelism_threads=1)) as sess:
            sess.run(tf.global_variables_initializer())
            # the release's own initial values of the learned initial state and the LSTM kernel (glorot uniform)
            results["init|init_state_0"], results["init|init_state_1"], results["init|lstm_kernel"] = sess.run(
                [state_vars["RNN/bidirectional_lstm/forward/init_state_0"],
                 state_vars["RNN/bidirectional_lstm/forward/init_state_1"],
                 next(v for v in tf.global_variables() if v.op.name == f"{LSTM}/kernel")])
            results["model_variables"] = np.array(sorted(assign_all(sess, tf.global_variables())))
            results["regularized"] = np.array(regularized)
            results["train_vars"] = np.array([v.op.name for v in train_vars])
            for case in inputs["cases"]:
                assign_all(sess, tf.global_variables())
                feed = {texts: arrays[f"{case}_ids"], seqlengths: arrays[f"{case}_lengths"]}
                for side in ("reference", "target"):
                    for i, ph in enumerate(maps[side]):
                        feed[ph] = nhwc(arrays[f"train_{side}_{i}"])
                masks = [arrays[f"{case}_mask_text"].reshape(b, 1, 1, -1)]
                masks += [arrays[f"{case}_mask_attention_{i}_{h}"] for i in range(levels) for h in range(2)]
                feed.update({call[2]: m for call, m in zip(dropout_calls, masks)})
                fetch = {"total_loss": total_loss, "matching": matching, "losses": tf.stack(losses), "reg": reg,
                         "sentence": sentence, "lstm_outputs": lstm_outputs, "text": captured["text"],
                         "grads": grads, "total_grads": total_grads,
                         "composite": captured["composite"],
                         "query": [p[0] for p in captured["pairs"]], "target": [p[1] for p in captured["pairs"]]}
                out = sess.run(fetch, feed)
                n_vars = len(train_vars)
                for k in ("total_loss", "matching", "losses", "reg", "sentence", "lstm_outputs", "text"):
                    results[f"{case}|{k}"] = np.asarray(out[k])
                for v, gr, tg in zip(train_vars, out["grads"][:n_vars], out["total_grads"]):
                    results[f"{case}|grad|{v.op.name}"] = np.asarray(gr, np.float32)
                    results[f"{case}|total_grad|{v.op.name}"] = np.asarray(tg, np.float32)
                for i in range(levels):
                    results[f"{case}|grad_map|reference|{i}"] = out["grads"][n_vars + i]
                    results[f"{case}|grad_map|target|{i}"] = out["grads"][n_vars + levels + i]
                    for k in ("composite", "query", "target"):
                        results[f"{case}|{k}|{i}"] = out[k][i]
                sess.run(update_ops, feed)  # the batch-norm moving averages of this step (decay 0.997)
                for v in moving:
                    results[f"{case}|moving|{v.op.name}"] = sess.run(v)

            # what the init rows of issue 24 change, on the `full` captions (no padding), everything else as above
            case = "full"
            assign_all(sess, tf.global_variables())
            feed = {texts: arrays[f"{case}_ids"], seqlengths: arrays[f"{case}_lengths"]}
            bias_var = next(v for v in tf.global_variables() if v.op.name == f"{LSTM}/bias")
            bias_var.load(arrays["lstm_bias_uncompensated"], sess)  # cirflow's b_ih + b_hh as they are
            results["variant|forget_bias_uncompensated"] = sess.run(sentence, feed)
            assign_all(sess, tf.global_variables())
            for i in (0, 1):  # the release's glorot-initialised learned initial state, instead of cirflow's
                state_vars[f"RNN/bidirectional_lstm/forward/init_state_{i}"].load(results[f"init|init_state_{i}"],
                                                                                   sess)
            results["variant|release_initial_state"] = sess.run(sentence, feed)
            for i in (0, 1):  # zeros: cirflow's h0 = c0 = 0 at initialisation
                state_vars[f"RNN/bidirectional_lstm/forward/init_state_{i}"].load(
                    np.zeros(state_vars[f"RNN/bidirectional_lstm/forward/init_state_{i}"].shape.as_list(),
                             np.float32), sess)
            results["variant|zero_initial_state"] = sess.run(sentence, feed)

    # --------------------------------------------------------------- inference graph (extract_features_val.py)
    FLAGS.batch_size, FLAGS.is_training = 1, False
    graph = tf.Graph()
    with graph.as_default():
        eval_maps = [tf.placeholder(tf.float32, (1, s[2], s[3], s[1])) for s in map_shapes]
        ns = dict(vars(release_model))
        ns["image_model_ml"] = lambda images: eval_maps
        modify = _release_function(release / "extract_features_val.py", "_image_modify_model", ns)
        texts = tf.placeholder(tf.int32, shape=(1, None))
        seqlengths = tf.placeholder(tf.int32, shape=(1,))
        features = modify("reference", texts, seqlengths, inputs["vocab_size"])
        with tf.Session(graph=graph) as sess:
            assign_all(sess, tf.global_variables())
            for case in inputs["cases"]:
                ids, lengths = arrays[f"{case}_ids"], arrays[f"{case}_lengths"]
                rows = []
                for q in range(b):  # extract_features_val.py l.248-262: one query at a time, its own length
                    feed = {texts: ids[q:q + 1, :lengths[q]], seqlengths: lengths[q:q + 1]}
                    feed.update({ph: nhwc(arrays[f"eval_reference_{i}"][q:q + 1]) for i, ph in enumerate(eval_maps)})
                    rows.append(sess.run(features, feed)[0])
                results[f"{case}|eval_query"] = np.stack(rows)
    bad = [(k, v.dtype) for k, v in results.items() if not isinstance(v, np.ndarray) or v.dtype.kind not in "fiU"]
    assert not bad, bad
    np.savez(work / "release.npz", **{_key(k): v for k, v in results.items()})


# ---------------------------------------------------------------------------------------------- the cirflow side
def cirflow_side(release: Path, tf_python: str) -> None:
    import datetime
    import platform

    import torch
    import yaml

    torch.set_num_threads(1)
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    sys.path.insert(0, str(HERE))
    import case as C
    from known_answers.layouts.val import LSTM as LAYOUT_LSTM, VAL_LAYOUT, _gates, comparable_state, tf_variables

    assert LAYOUT_LSTM == LSTM
    params = yaml.safe_load((REPO / "params.yaml").read_text())["model"]
    inputs = json.loads(json.dumps(DEFAULT_INPUTS))
    inputs["model"] = {**params, **inputs["model"]}
    C.INPUTS_FILE.write_text(json.dumps(inputs, indent=1) + "\n")
    inputs = C.load_inputs()

    model = C.build_model(inputs)
    release_state = VAL_LAYOUT.release_state(comparable_state(model.state_dict()))
    variables = {k: v.detach().numpy().astype(np.float32) for k, v in tf_variables(release_state).items()}
    arrays: dict[str, np.ndarray] = {}
    eval_ref, _ = C.trunk_maps(model, inputs, train=False)  # first: the trunk's fresh running statistics
    train_ref, train_tgt = C.trunk_maps(model, inputs, train=True)
    for i, (e, r, t) in enumerate(zip(eval_ref, train_ref, train_tgt)):
        arrays[f"eval_reference_{i}"], arrays[f"train_reference_{i}"], arrays[f"train_target_{i}"] = (
            e.numpy(), r.numpy(), t.numpy())
    for case in inputs["cases"]:
        ids, lengths = C.tokens(inputs, case)
        arrays[f"{case}_ids"], arrays[f"{case}_lengths"] = ids.numpy().astype(np.int32), lengths.numpy().astype(np.int32)
        masks = C.dropout_masks(inputs, model, case)
        arrays[f"{case}_mask_text"] = masks["text"].numpy()
        for i, level in enumerate(masks["attention"]):
            for h, m in enumerate(level):
                arrays[f"{case}_mask_attention_{i}_{h}"] = m.numpy()
    lstm = model.text_encoder.lstm
    arrays["lstm_bias_uncompensated"] = _gates(lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().numpy()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "inputs.json").write_text(json.dumps(inputs))
        np.savez(work / "cirflow.npz", **arrays)
        np.savez(work / "weights.npz", **{_key(k): v for k, v in variables.items()})
        proc = subprocess.run([tf_python, str(Path(__file__).resolve()), "--tf-side", "--release", str(release),
                               "--work", str(work)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"TF side failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        raw = {_unkey(k): v for k, v in np.load(work / "release.npz").items()}
        versions = subprocess.run([tf_python, "-c", "import tensorflow as tf, tf_slim, numpy; "
                                   "print(tf.__version__, tf_slim.__version__ if hasattr(tf_slim, '__version__') "
                                   "else '1.1.0', numpy.__version__)"],
                                  capture_output=True, text=True).stdout.split()

    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))

    def tf_named(prefix: str) -> dict[str, torch.Tensor]:
        """{release variable name: tensor} of the entries recorded under `prefix` (kept in the release's names and
        layout; the test maps them to cirflow's through the layout, so the name map is under test too)."""
        return {k[len(prefix) + 1:]: torch.from_numpy(np.asarray(v)) for k, v in raw.items()
                if k.startswith(prefix + "|")}

    release = {}
    for case in inputs["cases"]:
        r = {k: torch.tensor(float(raw[f"{case}|{k}"])) for k in ("total_loss", "matching", "reg")}
        r["level_losses"] = torch.from_numpy(raw[f"{case}|losses"])
        r["sentence"] = torch.from_numpy(raw[f"{case}|sentence"])
        r["lstm_outputs"] = torch.from_numpy(raw[f"{case}|lstm_outputs"])
        r["text"] = torch.from_numpy(raw[f"{case}|text"])
        levels = inputs["model"]["val"]["levels"]
        r["composite"] = [nchw(raw[f"{case}|composite|{i}"]) for i in range(levels)]
        r["query"] = [torch.from_numpy(raw[f"{case}|query|{i}"]) for i in range(levels)]
        r["target"] = [torch.from_numpy(raw[f"{case}|target|{i}"]) for i in range(levels)]
        r["grads"] = tf_named(f"{case}|grad")  # of the matching loss (the sum of the levels' losses)
        if case == "full":  # matching + the release's L2 term (REGULARIZATION_LOSSES, train_val.py l.128-129)
            r["total_grads"] = tf_named(f"{case}|total_grad")
        r["map_grads"] = {side: [nchw(raw[f"{case}|grad_map|{side}|{i}"]) for i in range(levels)]
                          for side in ("reference", "target")}
        r["moving"] = tf_named(f"{case}|moving")  # after the step's UPDATE_OPS
        eval_query, offset = torch.from_numpy(raw[f"{case}|eval_query"]), 0
        r["eval_query"] = []
        for c in model.transformers:  # the release concatenates the L2-normalised levels
            channels = c.fuse[0].out_channels
            r["eval_query"].append(eval_query[:, offset:offset + channels])
            offset += channels
        release[case] = r
    expected = {
        "release": release,
        "regularized": [str(v) for v in raw["regularized"]],  # the variables in the release's L2 term
        "trainable": [str(v) for v in raw["train_vars"]],
        "variants": {
            "forget_bias_uncompensated_sentence": torch.from_numpy(raw["variant|forget_bias_uncompensated"]),
            "release_initial_state_sentence": torch.from_numpy(raw["variant|release_initial_state"]),
            "zero_initial_state_sentence": torch.from_numpy(raw["variant|zero_initial_state"]),
            "release_init_state_0": torch.from_numpy(raw["init|init_state_0"]),  # c
            "release_init_state_1": torch.from_numpy(raw["init|init_state_1"]),  # h
            "release_lstm_kernel_init_absmax": float(np.abs(raw["init|lstm_kernel"]).max()),
        },
        "release_variables": [str(v) for v in raw["model_variables"]],  # the release graph's, less the loss EMAs
        # the values those variables were given (tf_variables of the layout's release_state): what produced the
        # recorded answers, so the test pins the export path (names, transposes, gate order, forget bias) to them
        "release_weights": {k: torch.from_numpy(v) for k, v in variables.items()},
        # per level (sum, sum of |x|) of the trunk maps both sides read: tells drifted inputs from a changed formula
        "maps_checksum": {name: torch.tensor([[m.sum().item(), m.abs().sum().item()] for m in maps])
                          for name, maps in (("train_reference", train_ref), ("train_target", train_tgt),
                                             ("eval_reference", eval_ref))},
        "meta": {"release": RELEASE, "tensorflow": versions, "torch": str(torch.__version__),
                 "python": platform.python_version(), "date": datetime.date.today().isoformat()},
    }
    torch.save(expected, HERE / "expected.pt")
    print(f"wrote {HERE / 'expected.pt'} ({(HERE / 'expected.pt').stat().st_size} bytes)")
    for case in inputs["cases"]:
        print(case, {k: float(release[case][k]) for k in ("matching", "reg", "total_loss")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", type=Path, required=True, help="the patched copy of yanbeic/VAL@8d12749")
    parser.add_argument("--tf-python", default=sys.executable, help="a Python with tensorflow (compat.v1), tf_slim")
    parser.add_argument("--tf-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tf_side:
        tf_side(args.release.resolve(), args.work)
    else:
        cirflow_side(args.release.resolve(), args.tf_python)


if __name__ == "__main__":
    main()
