"""`charlstm export` without PyTorch: a plain-NumPy forward written from PyTorch's documented
nn.LSTM equations (its gate order i, f, g, o, its two biases) over the exported tensors must score
a text as `charlstm eval` does; the metadata must come back as written; peephole models, bad
checkpoints, bad output paths and a missing safetensors package are each refused in one line."""
import json
import sys

import numpy as np
import pytest

import charlstm
from charlstm.checkpoint import load_checkpoint
from charlstm.cli import cli
from charlstm.export import read_export
from charlstm.model import views

from tests.conftest import SHAKESPEARE_HEAD, TINY, cli_runner
from tests.test_bad_input import bad_checkpoints, one_line_error
from tests.test_eval import make_model, write_checkpoint

TEXT = SHAKESPEARE_HEAD * 2  # scored text: only characters of the training corpus


def run(*args):
    return cli_runner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, text file) of a tiny 2-layer float64 model trained for a few steps."""
    folder = tmp_path_factory.mktemp("export")
    corpus = folder / "corpus.txt"
    corpus.write_text((SHAKESPEARE_HEAD * 3)[:1000], encoding="utf-8")
    result = run("train", corpus, *TINY, "--dtype", "float64", "--steps", 12, "--out", folder, "--run", "r",
                 "--quiet")
    assert result.exit_code == 0, result.output
    text = folder / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return folder / "r" / "latest.npz", text


# ------------------------------------------------------------------------ PyTorch's equations

def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def torch_lstm_nats(tensors, vocab, text):
    """Mean -log p over positions 2..N of text, one stream from zero state, computed as
    torch.nn.LSTM documents it, layer by layer (x_t one-hot for layer 0):

        i, f, g, o = chunks of W_ih x_t + b_ih + W_hh h_{t-1} + b_hh   (in that order)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(c_t)

    then nn.Linear (out.weight h_t + out.bias) and a log-softmax, all in float64."""
    t = {k: v.astype(np.float64) for k, v in tensors.items()}
    ids = np.array([vocab.index(ch) for ch in text])
    V, H = t["out.weight"].shape
    xs = list(np.eye(V)[ids[:-1]])
    for k in range(sum(name.startswith("lstm.weight_ih_l") for name in t)):
        W_ih, W_hh, b_ih, b_hh = (t[f"lstm.{n}_l{k}"] for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        h, c, hs = np.zeros(H), np.zeros(H), []
        for x in xs:
            i, f, g, o = np.split(W_ih @ x + b_ih + W_hh @ h + b_hh, 4)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
            hs.append(h)
        xs = hs
    logits = np.array(xs) @ t["out.weight"].T + t["out.bias"]  # (N-1, V)
    top = logits.max(axis=1, keepdims=True)
    log_p = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return -log_p[np.arange(len(ids) - 1), ids[1:]].mean()


def test_pytorch_equations_on_the_export_score_as_charlstm_eval(trained, tmp_path):
    ckpt, text = trained
    out = tmp_path / "model.safetensors"
    result = run("export", ckpt, out)
    assert result.exit_code == 0 and "wrote" in result.stdout, result.output
    result = run("eval", ckpt, text, "--json", "--threads", 1)
    assert result.exit_code == 0, result.output
    expected = json.loads(result.stdout)["nats_per_char"]
    tensors, meta = read_export(out)
    assert all(v.dtype == np.float64 for v in tensors.values())
    got = torch_lstm_nats(tensors, meta["vocab"], TEXT)
    assert abs(got - expected) < 1e-10, (got, expected)


def test_tensors_have_pytorchs_names_shapes_and_gate_order(tmp_path):
    params, config = make_model(layers=2, peepholes=False, dtype="float32")
    ckpt = write_checkpoint(tmp_path / "ck.npz", params, config)
    out = tmp_path / "m.safetensors"
    assert run("export", ckpt, out).exit_code == 0
    tensors, _ = read_export(out)
    V, H = config.vocab_size, config.hidden
    shapes = {"out.weight": (V, H), "out.bias": (V,)}
    for k in range(2):
        shapes.update({f"lstm.weight_ih_l{k}": (4 * H, V if k == 0 else H), f"lstm.weight_hh_l{k}": (4 * H, H),
                       f"lstm.bias_ih_l{k}": (4 * H,), f"lstm.bias_hh_l{k}": (4 * H,)})
    assert {k: v.shape for k, v in tensors.items()} == shapes
    assert all(v.dtype == np.float32 for v in tensors.values())  # the checkpoint's dtype, kept
    i, f, o, g = np.split(views(params, config)["l1.Wh"], 4)  # our gate order -> PyTorch's i, f, g, o
    assert np.array_equal(tensors["lstm.weight_hh_l1"], np.concatenate([i, f, g, o]))
    assert not tensors["lstm.bias_hh_l0"].any() and not tensors["lstm.bias_hh_l1"].any()


def test_metadata_round_trip(trained, tmp_path):
    ckpt, _ = trained
    out = tmp_path / "m.safetensors"
    assert run("export", ckpt, out).exit_code == 0
    manifest = load_checkpoint(ckpt).manifest
    _, meta = read_export(out)
    model = manifest["model"]
    assert meta == {"format": "charlstm-export", "charlstm_version": charlstm.__version__,
                    "vocab": model["vocab"], "vocab_size": len(model["vocab"]), "hidden": model["hidden"],
                    "layers": model["layers"], "dtype": "float64", "step": 12}
    assert manifest["step"] == 12


def test_vocab_with_any_characters_round_trips(tmp_path):
    params, config = make_model(layers=1, peepholes=False)  # its vocab has '\n', ' ', 'é', 'ù', ...
    out = tmp_path / "m.safetensors"
    assert run("export", write_checkpoint(tmp_path / "ck.npz", params, config), out).exit_code == 0
    assert read_export(out)[1]["vocab"] == config.vocab


# ------------------------------------------------------------------------------------ refusals

def test_peephole_model_is_refused_in_one_line(tmp_path):
    params, config = make_model(layers=2, peepholes=True)
    ckpt = write_checkpoint(tmp_path / "peep.npz", params, config)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"an older export")
    one_line_error(run("export", ckpt, out), "peep.npz", "peepholes", "no PyTorch nn.LSTM equivalent", code=1)
    assert out.read_bytes() == b"an older export"  # left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "peep.npz"]


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "random bytes", "foreign npz", "pickle",
                                  "newer version"])
def test_bad_checkpoint_is_refused_in_one_line(tmp_path, case):
    path, words = bad_checkpoints(tmp_path)[case]
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    one_line_error(run("export", path, out), path.name, *words, code=1)
    assert list(out.parent.iterdir()) == []  # nothing written, no temp file left


@pytest.mark.parametrize("out, words", [
    ("folder", ["is a folder"]),
    ("no-such-folder/m.safetensors", ["cannot write", "check the folder exists"]),
    ("ck.npz", ["is the checkpoint itself"]),
])
def test_bad_output_path_is_refused_in_one_line(tmp_path, out, words):
    params, config = make_model(layers=1, peepholes=False)
    ckpt = write_checkpoint(tmp_path / "ck.npz", params, config)
    (tmp_path / "folder").mkdir()
    before = ckpt.read_bytes()
    one_line_error(run("export", ckpt, tmp_path / out), *words, code=1)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz", "folder"]


def test_missing_safetensors_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # `import safetensors...` now fails
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    params, config = make_model(layers=1, peepholes=False)
    ckpt = write_checkpoint(tmp_path / "ck.npz", params, config)
    line = one_line_error(run("export", ckpt, tmp_path / "m.safetensors"), code=1)
    assert line == "Error: exporting needs the safetensors package: pip install 'charlstm[export]'"
    assert not (tmp_path / "m.safetensors").exists()
