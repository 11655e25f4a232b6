"""The per-parameter gradient scale RMS (P,) that dynamic evaluation divides its steps by.

Two sources:

  text        Krause et al.'s own: RMS = sqrt(mean over segments of g*g), g the gradient of each
              segment's mean loss over training text at the checkpoint's weights: segments of n
              characters of one stream, no dropout, exactly the gradients dynamic evaluation takes
              (dynamic.Segments with an accumulator in place of the update).
  checkpoint  the optimizer's second-moment state, which training left at those same weights:
                RMSprop  sqrt(ms)                 ms an average of g*g over the last ~1/(1-alpha) steps
                Adam     sqrt(v / (1 - beta2^t))  v the same over ~1/(1-beta2) steps, bias-corrected
                Adagrad  sqrt(mem / t)            mem the sum of g*g over all t steps
              These are gradients of training batches (B*T positions, with dropout and clipping),
              so their size differs from a segment's, by a factor that eta absorbs; what dynamic
              evaluation needs from RMS is which parameters get large gradients and which small,
              and benchmarks/dynamic_eval.py measures how close the two sources are in that.
"""
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from charlstm.config import RMS_TEXT_CHARS
from charlstm.data import file_sha256, split
from charlstm.dynamic import Segments
from charlstm.engine.jit import kernel
from charlstm.errors import UserError
from charlstm.evaluate import open_text


def from_checkpoint(ckpt, path):
    """RMS (P,) float64 from the checkpoint's optimizer state, and a few words on where it came
    from. A state that holds no scale (a run saved before its first step, or zeros) is a
    UserError telling the user how to get one."""
    cfg, step = ckpt.train_config, ckpt.manifest.get("step", 0)
    state = {k: v.astype(np.float64) for k, v in ckpt.optim_state.items()}
    if cfg.optim == "rmsprop":
        rms, words = np.sqrt(state["rmsprop"]), f"RMSprop's mean square (alpha {cfg.rmsprop_alpha:g})"
    elif cfg.optim == "adam" and step > 0:
        rms, words = np.sqrt(state["adam_v"] / (1.0 - cfg.adam_beta2 ** step)), "Adam's second moment"
    elif cfg.optim == "adagrad" and step > 0:
        rms, words = np.sqrt(state["adagrad"] / step), f"Adagrad's sum over {step:,} steps"
    else:
        rms, words = np.zeros(1), ""
    if not np.all(np.isfinite(rms)) or not rms.any():
        raise UserError(f"{path} holds no gradient scale (its {cfg.optim} state is empty at step {step}); "
                        f"measure one on the text it was trained on with --rms-text "
                        f"{ckpt.manifest.get('corpus', {}).get('path', 'TRAINING_TEXT')}")
    return rms, f"the checkpoint's {words}"


def from_text(ckpt, path, n, chars=RMS_TEXT_CHARS, encoding="utf-8", unknown="error", progress=True, warn=print):
    """RMS (P,) float64 measured on the text file at `path` (its first `chars` characters; if it
    is the checkpoint's own corpus, never past the end of its training split), in segments of n,
    and a few words on where it came from."""
    start = time.perf_counter()
    text = open_text(ckpt.model_config, path, encoding, unknown, warn, what="--rms-text file")
    if _same_file(path, ckpt.manifest.get("corpus", {})):
        chars = min(chars, split(text.kept, ckpt.train_config.val_frac)[0])
    square_sums = np.zeros(len(ckpt.params))
    segments = Segments(ckpt.params, ckpt.model_config, n, lambda params, grads: add_squares(square_sums, grads))
    left = chars
    with tqdm(total=chars - 1, unit="char", unit_scale=True, desc="measuring RMS", file=sys.stderr, delay=1.0,
              disable=not progress, dynamic_ncols=True) as bar:
        for ids in text.pieces():
            segments.feed(ids[:left])
            left -= min(left, len(ids))
            bar.update(segments.count - bar.n)
            if left == 0:
                break
        segments.finish()
        bar.update(segments.count - bar.n)
    count = -(-segments.count // n)  # segments, the last perhaps shorter
    return np.sqrt(square_sums / count), (f"{segments.count:,} characters of {path} "
                                          f"({time.perf_counter() - start:.1f} s)")


def _same_file(path, corpus):
    """Whether path holds the corpus a checkpoint records ({path, size, sha256})."""
    return os.path.getsize(path) == corpus.get("size") and file_sha256(path) == corpus.get("sha256")


@kernel
def add_squares(total, g):
    """total (P,) float64 += g * g, elementwise."""
    for j in range(g.shape[0]):
        total[j] += np.float64(g[j]) * np.float64(g[j])
