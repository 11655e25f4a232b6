#!/usr/bin/env python3
"""Dynamic evaluation's settings, chosen on held-out text: tune on the first half of a checkpoint's
validation split, report the second half, then the whole split with the defaults.

    python benchmarks/dynamic_eval.py CKPT [--corpus data/tinyshakespeare.txt] [--rms checkpoint text]

The validation split is the corpus's tail the checkpoint's run held out (its --val-frac): for the
bundled corpus, the end of one play and the start of The Tempest, whose speakers never occur in
the training text. Protocol:

 1. RMS, the gradient scale, from each source asked for: the checkpoint's optimizer state, and
    measured on the first RMS_TEXT_CHARS characters of the training split (gradient_scale.py);
    how close they are (correlation of log RMS over all parameters, their ratio).
 2. For each source, tuned on the first half (a coordinate search, not the whole product):
      a. lambda = 0, every (n, eta) of SEGMENTS x ETAS (eta scaled by the source's mean RMS
         over the text source's, so one grid fits both; a diverging run scores inf);
      b. at the best (n, eta): every lambda of LAMBDAS;
      c. at the best (n, lambda): eta x 0.7 and x 1.4;
      d. at the best (n, eta, lambda): every eps of EPSS.
 3. The second half with each source's tuned values: static against dynamic, with times.
 4. The whole split with the defaults (config.DYNAMIC_*, RMS from the checkpoint): static against
    dynamic, with times: what `charlstm eval CKPT VALIDATION --dynamic` prints.
Every pass runs from zero state. Times are wall-clock on a shared machine: noisy.
"""
import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charlstm import gradient_scale  # noqa: E402
from charlstm.checkpoint import load_checkpoint  # noqa: E402
from charlstm.config import RMS_TEXT_CHARS, DynamicConfig  # noqa: E402
from charlstm.data import load_corpus, split  # noqa: E402
from charlstm.dynamic import Diverged, run_ids  # noqa: E402

SEGMENTS = (20, 50, 100)
ETAS = (1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3)  # for RMS measured on text; scaled for the checkpoint's
LAMBDAS = (0.002, 0.01, 0.05)
EPSS = (1e-6, 1e-5, 1e-4)  # eps: 1e-5 (config.DYNAMIC_EPS when this was written) until step d


def nats(params, config, ids, settings, rms):
    """Mean nats of a dynamic pass (inf if it diverged) and its seconds."""
    try:
        result, _ = run_ids(params, config, ids, settings, rms)
    except Diverged:
        return math.inf, math.nan
    return result.score.nats_per_char, result.seconds


def tune(params, config, ids, rms, scale, say):
    """The coordinate search of step 2 on ids: returns the best DynamicConfig and its nats."""
    tried = {}

    def score(n, eta, lam, eps=1e-5):
        key = (n, round(eta, 12), lam, eps)
        if key not in tried:
            tried[key], seconds = nats(params, config, ids, DynamicConfig(n, eta, lam, eps), rms)
            say(f"    n {n:>4}  eta {eta:<9.3g} lambda {lam:<6g} eps {eps:<6g} {tried[key]:.4f} nats  ({seconds:.1f} s)")
        return tried[key]

    best = min(((n, eta * scale, 0.0) for n in SEGMENTS for eta in ETAS), key=lambda k: score(*k))
    n, eta, _ = best
    best = min([best] + [(n, eta, lam) for lam in LAMBDAS], key=lambda k: score(*k))
    n, eta, lam = best
    best = min([best, (n, eta * 0.7, lam), (n, eta * 1.4, lam)], key=lambda k: score(*k))
    best = min([(*best, eps) for eps in EPSS], key=lambda k: score(*k))
    return DynamicConfig(*best), score(*best)


def compare(label, params, config, ids, settings, rms, say):
    """Static against dynamic on ids, with times."""
    static, _ = run_ids(params, config, ids, settings)
    try:
        dynamic, _ = run_ids(params, config, ids, settings, rms)
        d, d_s = dynamic.score, dynamic.seconds
        d_text = f"{d.nats_per_char:.4f} nats ({d.bits_per_char:.4f} bpc, ppl {d.perplexity:.3f}) in {d_s:.1f} s"
    except Diverged:
        d_text = "diverged"
    s = static.score
    say(f"  {label}: {s.chars:,} chars, {settings.describe()}")
    say(f"    static  {s.nats_per_char:.4f} nats ({s.bits_per_char:.4f} bpc, ppl {s.perplexity:.3f}) "
        f"in {static.seconds:.1f} s")
    say(f"    dynamic {d_text}")


def rms_sources(ckpt, path, corpus, names, say):
    sources = {}
    if "checkpoint" in names:
        sources["checkpoint"], words = gradient_scale.from_checkpoint(ckpt, path)
        say(f"RMS checkpoint: {words}")
    if "text" in names:
        start = time.perf_counter()
        sources["text"], words = gradient_scale.from_text(ckpt, corpus, DynamicConfig().segment, progress=False)
        say(f"RMS text: {words}, {time.perf_counter() - start:.1f} s")
    if len(sources) == 2:
        a, b = sources["checkpoint"], sources["text"]
        both = (a > 0) & (b > 0)
        log_ratio = np.log(a[both] / b[both])
        say(f"  checkpoint / text: correlation of log RMS {np.corrcoef(np.log(a[both]), np.log(b[both]))[0, 1]:.3f} "
            f"over {both.sum():,} of {a.size:,} parameters; ratio median {np.exp(np.median(log_ratio)):.3f}, "
            f"5-95% {np.exp(np.quantile(log_ratio, 0.05)):.3f}-{np.exp(np.quantile(log_ratio, 0.95)):.3f}; "
            f"zeros {np.count_nonzero(a == 0):,} and {np.count_nonzero(b == 0):,}")
    return sources


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--corpus", default=str(ROOT / "data" / "tinyshakespeare.txt"))
    p.add_argument("--rms", nargs="+", choices=("checkpoint", "text"), default=["checkpoint", "text"])
    args = p.parse_args()
    say = lambda line: print(line, flush=True)
    ckpt = load_checkpoint(args.checkpoint)
    config, params = ckpt.model_config, ckpt.params
    with tempfile.TemporaryDirectory() as cache:
        ids = np.asarray(load_corpus(args.corpus, cache, vocab=config.vocab).ids, dtype=np.int32)
    n_train, _ = split(len(ids), ckpt.train_config.val_frac)
    val = ids[n_train:]
    first, second = val[:len(val) // 2], val[len(val) // 2:]
    say(f"{args.checkpoint}: {config.layers}x{config.hidden}, step {ckpt.manifest.get('step')}; validation "
        f"{len(val):,} chars, halves {len(first):,} + {len(second):,}; RMS text: the first "
        f"{min(RMS_TEXT_CHARS, n_train):,} of {n_train:,} training chars")
    sources = rms_sources(ckpt, args.checkpoint, args.corpus, args.rms, say)
    reference = sources.get("text")
    static, _ = run_ids(params, config, first, DynamicConfig())
    say(f"static score of the first half: {static.score.nats_per_char:.4f} nats")
    tuned = {}
    for name, rms in sources.items():
        scale = 1.0 if reference is None else float(rms.mean() / reference.mean())
        say(f"tuning on the first half, RMS {name} (etas scaled by {scale:.3g}):")
        tuned[name], best = tune(params, config, first, rms, scale, say)
        say(f"  best: {tuned[name].describe()}: {best:.4f} nats")
    say("second half, tuned values:")
    for name, settings in tuned.items():
        compare(f"RMS {name}", params, config, second, settings, sources[name], say)
    say("whole validation split, the defaults:")
    default_rms, _ = gradient_scale.from_checkpoint(ckpt, args.checkpoint)
    compare("RMS checkpoint", params, config, val, DynamicConfig(), default_rms, say)


if __name__ == "__main__":
    main()
