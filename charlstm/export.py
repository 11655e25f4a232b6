"""`charlstm export`: a checkpoint's weights as a .safetensors file in PyTorch's layout, so that a
model trained here can be loaded into torch.nn.LSTM + torch.nn.Linear (or anything that reads
safetensors) and give the same numbers there.

Tensors (H hidden, V vocab, L layers; D = V for layer 0, whose input is one-hot, H above):

    lstm.weight_ih_l{k}  (4H, D)   our l{k}.Wx, rows reordered to PyTorch's gates i, f, g, o
    lstm.weight_hh_l{k}  (4H, H)   our l{k}.Wh, likewise
    lstm.bias_ih_l{k}    (4H,)     our l{k}.b, likewise
    lstm.bias_hh_l{k}    (4H,)     zeros: PyTorch adds two biases, we have one
    out.weight           (V, H)    our out.W
    out.bias             (V,)      our out.b

in the checkpoint's dtype (float32 or float64). The metadata (safetensors allows only strings)
holds what is needed to rebuild the modules and map text to ids: `vocab` (a JSON string of the
vocabulary in id order), `hidden`, `layers`, `vocab_size`, `dtype`, `format`, `charlstm_version`
and `step`. Peephole models have no nn.LSTM equivalent and are refused.
"""
import json
import os

import numpy as np

from charlstm import __version__
from charlstm.checkpoint import atomic_write, load_checkpoint
from charlstm.errors import UserError
from charlstm.model import views

FORMAT = "charlstm-export"
INSTALL = "exporting needs the safetensors package: pip install 'charlstm[export]'"


def to_torch_gates(W):
    """Rows of a 4H block from our gate order i, f, o, g to PyTorch's i, f, g, o (a copy)."""
    i, f, o, g = np.split(W, 4)
    return np.ascontiguousarray(np.concatenate([i, f, g, o]))


def torch_tensors(params, config):
    """{PyTorch state_dict name: array} for a model without peepholes."""
    w = views(params, config)
    tensors = {}
    for k in range(config.layers):
        tensors[f"lstm.weight_ih_l{k}"] = to_torch_gates(w[f"l{k}.Wx"])
        tensors[f"lstm.weight_hh_l{k}"] = to_torch_gates(w[f"l{k}.Wh"])
        tensors[f"lstm.bias_ih_l{k}"] = to_torch_gates(w[f"l{k}.b"])
        tensors[f"lstm.bias_hh_l{k}"] = np.zeros(4 * config.hidden, dtype=params.dtype)
    tensors["out.weight"] = np.ascontiguousarray(w["out.W"])
    tensors["out.bias"] = np.ascontiguousarray(w["out.b"])
    return tensors


def metadata(config, step):
    """The safetensors metadata: every value a string."""
    return {"format": FORMAT, "charlstm_version": __version__, "vocab": json.dumps(config.vocab),
            "vocab_size": str(config.vocab_size), "hidden": str(config.hidden),
            "layers": str(config.layers), "dtype": config.dtype, "step": str(step)}


def export(checkpoint, out):
    """Write CHECKPOINT's weights to OUT atomically (OUT is replaced whole or left as it was).
    Returns the metadata written."""
    save = _safetensors_save()
    out = os.fspath(out)
    if os.path.isdir(out):
        raise UserError(f"{out}: is a folder; pass the path of the .safetensors file to write")
    if os.path.exists(out) and os.path.exists(checkpoint) and os.path.samefile(out, checkpoint):
        raise UserError(f"{out}: is the checkpoint itself; pass another path to write to")
    ckpt = load_checkpoint(checkpoint)
    config = ckpt.model_config
    if config.peepholes:
        raise UserError(f"{os.fspath(checkpoint)}: a model with peepholes has no PyTorch nn.LSTM "
                        "equivalent, so it cannot be exported; train one without --peepholes")
    meta = metadata(config, ckpt.manifest.get("step", 0))
    data = save(torch_tensors(ckpt.params, config), metadata=meta)  # bytes of the whole file
    atomic_write(out, lambda f: f.write(data))
    return meta


def _safetensors_save():
    """safetensors.numpy.save, imported only when exporting (it is an optional extra)."""
    try:
        from safetensors.numpy import save
    except ImportError:
        raise UserError(INSTALL) from None
    return save


def read_export(path):
    """(tensors {name: array}, metadata) of an exported file, with vocab, vocab_size, hidden,
    layers and step decoded from their strings: the inverse of export, for tests and scripts."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise UserError(INSTALL) from None
    with safe_open(os.fspath(path), framework="numpy") as f:
        meta = dict(f.metadata() or {})
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    meta["vocab"] = json.loads(meta["vocab"])
    for key in ("vocab_size", "hidden", "layers", "step"):
        meta[key] = int(meta[key])
    return tensors, meta
