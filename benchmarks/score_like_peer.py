#!/usr/bin/env python3
"""Score a charlstm checkpoint the way the PyTorch peer scores its own model, to compare like for like.

    python benchmarks/score_like_peer.py CKPT [--corpus data/tinyshakespeare.txt] [--peer ../shared/tools/peer_torch.py]

charlstm validates by reading the validation split as one stream from zero state (SPEC §2); the
peer reads it as 50 streams of 50-step windows, each stream starting from zero state, which scores
about 0.005-0.008 nats higher on the same weights. This loads CKPT's weights into the peer's torch
model (gate rows reordered from our i, f, o, g to torch's i, f, g, o; the bias goes to b_ih, b_hh
is zero) and calls the peer's own evaluate(). Needs torch, which charlstm itself never imports.
With --streams 1 it reproduces charlstm's own validation to 1e-4 (the peer drops the split's last
partial window), which checks the weight mapping: 1.5487 against 1.5486 for a 2x256 checkpoint.
"""
import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--corpus", default=str(ROOT / "data" / "tinyshakespeare.txt"))
    p.add_argument("--peer", default=str(ROOT.parent / "shared" / "tools" / "peer_torch.py"))
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--seq", type=int, default=50)
    args = p.parse_args()

    import torch
    from charlstm.checkpoint import load_checkpoint
    from charlstm.model import views

    spec = importlib.util.spec_from_file_location("peer_torch", args.peer)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)

    ckpt = load_checkpoint(args.checkpoint)
    config, train = ckpt.model_config, ckpt.train_config
    w = views(ckpt.params.astype(np.float32), config)
    _, val_ids, vocab = peer.load(args.corpus, train.val_frac)
    if vocab != config.vocab_size:
        raise SystemExit(f"the corpus has {vocab} distinct characters, the checkpoint {config.vocab_size}")
    if config.peepholes:
        raise SystemExit("the peer's model has no peepholes")
    H = config.hidden
    model = peer.CharLSTM(vocab, H, config.layers)
    torch_rows = np.r_[0:2 * H, 3 * H:4 * H, 2 * H:3 * H]  # our rows i, f, o, g -> torch's i, f, g, o
    with torch.no_grad():
        for l in range(config.layers):
            for ours, theirs in (("Wx", "weight_ih"), ("Wh", "weight_hh"), ("b", "bias_ih")):
                getattr(model.lstm, f"{theirs}_l{l}").copy_(torch.from_numpy(w[f"l{l}.{ours}"][torch_rows].copy()))
            getattr(model.lstm, f"bias_hh_l{l}").zero_()
        model.out.weight.copy_(torch.from_numpy(w["out.W"].copy()))
        model.out.bias.copy_(torch.from_numpy(w["out.b"].copy()))
    loss = peer.evaluate(model, val_ids, args.streams, args.seq)
    print(f"scored the peer's way ({args.streams} streams x {args.seq}): {loss:.4f} nats "
          f"({loss / math.log(2):.4f} bits/char); charlstm's own validation: {ckpt.manifest['metrics']['val_loss']:.4f}")


if __name__ == "__main__":
    main()
