"""`charlstm info`: a checkpoint described for people (or as JSON for programs)."""
import json
import math
import os

from charlstm.checkpoint import load_checkpoint
from charlstm.model import param_count


def _loss(nats):
    return "-" if nats is None else f"{nats:.4f} nats ({nats / math.log(2):.4f} bits/char)"


def _lr_now(lr):
    """The lr in force (written since the schedule options exist; older files have none)."""
    return f"; lr now {lr:g}" if isinstance(lr, (int, float)) and not isinstance(lr, bool) else ""


def _size(arrays):
    arrays = list(arrays)
    total = sum(a.nbytes for a in arrays)
    size = f"{total / 1e6:.1f} MB" if total >= 1e6 else f"{total / 1e3:.1f} kB"
    return f"{len(arrays)} x {arrays[0].size:,} {arrays[0].dtype} values, {size}"


def describe(path, as_json=False):
    ckpt = load_checkpoint(path)
    m, model, train = ckpt.manifest, ckpt.model_config, ckpt.train_config
    if as_json:
        return json.dumps({**m, "file_size": os.path.getsize(path), "param_count": param_count(model)},
                          indent=2, sort_keys=True)
    metrics = m.get("metrics", {})
    cursor = m.get("cursor", {})
    corpus = m.get("corpus", {})
    lines = [
        f"checkpoint   {path} ({os.path.getsize(path) / 1e6:.1f} MB, format {m['format']} v{m['version']})",
        f"model        {model.layers}x{model.hidden} LSTM{' with peepholes' if model.peepholes else ''}, "
        f"vocab {model.vocab_size}, {param_count(model):,} parameters, {model.dtype}, precision {train.precision}",
        f"training     batch {train.batch_size} x seq {train.seq_length}, clip {train.clip} ({train.clip_mode}), "
        f"dropout {train.dropout}" + (f" (ramped over {train.dropout_warmup:g} epochs)" if train.dropout_warmup else "")
        + (f", weight drop {train.weight_drop}" if train.weight_drop else "")
        + f", init {train.init}, val-frac {train.val_frac}, seed {train.seed}",
        f"optimizer    {train.recipe()}{_lr_now(m.get('lr'))}",
        f"             state {', '.join(ckpt.optim_state)}: {_size(ckpt.optim_state.values())}",
        f"progress     step {m.get('step', 0):,}, epoch {m.get('epoch', 0)} "
        f"(window {cursor.get('window', 0)} of {cursor.get('windows_per_epoch', '?')}), "
        f"{m.get('chars_seen', 0):,} chars seen",
        f"train loss   {_loss(metrics.get('train_loss_smoothed'))} (smoothed)",
        f"val loss     {_loss(metrics.get('val_loss'))}; best {_loss(m.get('best_val_loss'))}",
        f"corpus       {corpus.get('path', '?')} ({corpus.get('size', 0):,} bytes, sha256 {corpus.get('sha256', '?')[:16]}...)",
    ]
    return "\n".join(lines)
