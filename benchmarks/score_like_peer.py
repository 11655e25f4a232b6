#!/usr/bin/env python3
"""Score a charlstm checkpoint with the PyTorch peer's own model and evaluate(), to compare like for like.

    python benchmarks/score_like_peer.py CKPT [--corpus data/tinyshakespeare.txt] [--peer benchmarks/peer_torch.py]
                                              [--streams 50] [--seq 50]

charlstm validates by reading the validation split as one stream from zero state (SPEC §2), and so
does the peer by default (`--val-streams 1`). Its `--val-streams B` reads the split as B streams,
each from zero state (the peer's only way before, with B = --batch = 50), which scores about
0.005-0.008 nats higher on the same weights. This loads CKPT's weights into the peer's torch model
through `charlstm export`'s mapping (export.torch_tensors: gate rows from our i, f, o, g to torch's
i, f, g, o, the bias in b_ih, b_hh zero) and calls the peer's evaluate() on the split (its first
200,000 chars, as both validate). With --streams 1 it reproduces charlstm's own validation, which
checks the mapping and the peer's scoring. Needs torch (pip install -e '.[bench]'), which charlstm
itself never imports.
"""
import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def load_peer(path):
    """The peer program as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("peer_torch", path)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    return peer


def peer_model(peer, params, config):
    """The peer's CharLSTM holding charlstm's params (no peepholes), in float32 as the peer trains."""
    import torch

    from charlstm.export import torch_tensors

    model = peer.CharLSTM(config.vocab_size, config.hidden, config.layers)
    model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in torch_tensors(params, config).items()})
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--corpus", default=str(ROOT / "data" / "tinyshakespeare.txt"))
    p.add_argument("--peer", default=str(ROOT / "benchmarks" / "peer_torch.py"))
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--seq", type=int, default=50)
    args = p.parse_args()
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("scoring with the PyTorch peer needs torch: pip install -e '.[bench]'")

    from charlstm.checkpoint import load_checkpoint

    peer = load_peer(args.peer)
    ckpt = load_checkpoint(args.checkpoint)
    config = ckpt.model_config
    if config.peepholes:
        raise SystemExit("the peer's model has no peepholes")
    _, val_ids, vocab = peer.load(args.corpus, ckpt.train_config.val_frac)
    if vocab != config.vocab:
        raise SystemExit(f"the corpus's {len(vocab)} distinct characters are not the checkpoint's vocabulary "
                         f"({config.vocab_size}); give the corpus it was trained on")
    model = peer_model(peer, ckpt.params, config)
    loss = peer.evaluate(model, val_ids[:peer.VAL_MAX_CHARS], args.streams, args.seq)
    print(f"scored the peer's way ({args.streams} streams x {args.seq}): {loss:.4f} nats "
          f"({loss / math.log(2):.4f} bits/char); charlstm's own validation: {ckpt.manifest['metrics']['val_loss']:.4f}")


if __name__ == "__main__":
    main()
