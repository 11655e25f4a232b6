#!/usr/bin/env python3
"""The PyTorch peer: charlstm's job written as a PyTorch user would write it, to measure against.

benchmarks/vs_peer.py runs its `speed` mode beside `charlstm bench`; score_like_peer.py loads a
charlstm checkpoint into its model and scores it with its evaluate(). It imports nothing from
charlstm. Needs torch: pip install -e '.[bench]' (pyproject.toml says which build that gets).

The same job, so that speed and quality compare like for like (SPEC §1-2, charlstm/data.py,
charlstm/train.py, charlstm/validate.py):

  model      one-hot chars -> nn.LSTM (L layers of H) -> nn.Linear -> softmax, cross-entropy mean
             over the B*T predictions of a step; PyTorch's own initialisation (charlstm's default
             `--init fan-in` is the same distribution). No peepholes (nn.LSTM has none).
  vocab      the sorted distinct code points of the UTF-8 corpus, read without newline translation
  split      n_val = floor(N * val_frac) (default 0.05); the first N - n_val ids train, the tail
             validates
  batching   n = (N_train - 1) // B; stream b covers ids[b*n : (b+1)*n + 1]; step s (from 0) uses
             window k = s mod (n // T); h, c carry from window to window (detached: gradients stop
             at the boundary) and reset to zero at each epoch start
  recipe     charlstm train's defaults: RMSprop lr 2e-3 (alpha 0.95, eps 1e-8; Adagrad's default
             lr 0.02, Adam's 2e-3), clipping each gradient entry at 5 (--clip-mode norm: the global
             L2 norm; --clip 0: off), dropout on every layer's output on its way up (nn.LSTM's
             dropout between layers, nn.Dropout before nn.Linear) rising from 0 to 0.3 over the
             first 20 epochs; the lr x0.85 at every epoch end from the end of epoch 7 (set on the
             optimizer's param groups as each step starts; --lr-decay-every N: torch-rnn's steps)
  validation the validation split's first 200,000 chars (charlstm.validate.VAL_MAX_CHARS) read as
             one stream from zero state, on its own state, every prediction scored
             (--val-streams B: as B streams, each from zero state)
  sampling   at every validation, 200 chars at temperature 0.8, the first drawn uniformly, as
             charlstm train's preview

Modes (--batch-size and --seq-length, charlstm's names, may stand for --batch and --seq):

  peer_torch.py speed CORPUS --hidden 256 --layers 2 --batch 50 --seq 50 --steps 50 --threads 2
      full training steps (forward, backward, clip, optimizer; no dropout unless --dropout is
      given, as `charlstm bench`) timed after --warmup untimed ones; prints  chars_per_s=<float>
  peer_torch.py train CORPUS --seconds 600 | --max-steps N  [--eval-every N]
      trains for a wall-clock budget or a step count; with --eval-every N prints
      step=<int> val_loss_nats=<float> val_bpc=<float> and a sample every N steps (evaluation and
      sampling are not counted in --seconds; charlstm's --time-limit counts its own), and at the end
      step=<int> val_loss_nats=<float> val_bpc=<float> chars_seen=<int> chars_per_s=<float>
  peer_torch.py sample CORPUS --hidden 512 --layers 2 --length 2000
      generates one char at a time from an untrained model, as a PyTorch sampling loop does;
      prints  sample_chars_per_s=<float>
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn

DEFAULT_LR = {"adagrad": 0.02, "rmsprop": 2e-3, "adam": 2e-3}  # charlstm.config.DEFAULT_LR
VAL_MAX_CHARS = 200_000  # charlstm.validate.VAL_MAX_CHARS: validation scores this prefix
PREVIEW_CHARS, PREVIEW_TEMPERATURE = 200, 0.8  # charlstm.train's sample at every validation


class CharLSTM(nn.Module):
    """Parameter names are those of `charlstm export` (lstm.*, out.*), so its state_dict loads."""

    def __init__(self, vocab_size, hidden, layers, dropout=0.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.lstm = nn.LSTM(vocab_size, hidden, layers, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, vocab_size)

    def set_dropout(self, p):
        """Drop each layer's output with probability p (between layers, and before the output)."""
        if self.lstm.num_layers > 1:
            self.lstm.dropout = p
        self.drop.p = p

    def forward(self, x_ids, state):
        """x_ids (T, B) int64, state None (zeros) or (h, c) each (L, B, H) -> logits (T, B, V), state."""
        x = nn.functional.one_hot(x_ids, self.vocab_size).float()
        h, state = self.lstm(x, state)
        return self.out(self.drop(h)), state


def load(path, val_frac):
    """(train ids, validation ids, vocab): vocab the sorted distinct chars as a string, ids (N,)
    int64 indices into it."""
    with open(path, encoding="utf-8", newline="") as f:  # newline="": "\r\n" stays two chars
        text = f.read()
    vocab = "".join(sorted(set(text)))
    idx = {c: i for i, c in enumerate(vocab)}
    ids = np.array([idx[c] for c in text], dtype=np.int64)
    n_val = math.floor(len(ids) * val_frac)
    return ids[: len(ids) - n_val], ids[len(ids) - n_val:], vocab


def streams(ids, batch):
    """x, y (n, batch) int64 tensors, time-major: column b is stream b, ids[b*n : (b+1)*n] and the
    chars after them, with n = (len(ids) - 1) // batch."""
    n = (len(ids) - 1) // batch
    x = ids[: n * batch].reshape(batch, n)
    y = ids[1: n * batch + 1].reshape(batch, n)
    return torch.from_numpy(x.T.copy()), torch.from_numpy(y.T.copy())


def window(x, y, step, seq):
    """Inputs and targets (seq, B) of optimizer step `step` (from 0): window k = step mod (n // seq)
    of x, y (n, B) from streams(), and k (k = 0 starts an epoch, from zero state)."""
    k = step % (x.shape[0] // seq)
    return x[k * seq:(k + 1) * seq], y[k * seq:(k + 1) * seq], k


def evaluate(model, ids, batch, seq):
    """Mean nats per prediction of ids read as `batch` streams (streams()), each from zero state,
    seq steps at a time with h, c carried, the last, shorter window included. batch=1 scores
    every char after the first given all before it: charlstm's validation and `charlstm eval`."""
    model.eval()
    x, y = streams(ids, batch)
    state, total, count = None, 0.0, 0
    with torch.no_grad():
        for t in range(0, x.shape[0], seq):
            logits, state = model(x[t:t + seq], state)
            target = y[t:t + seq].reshape(-1)
            total += nn.functional.cross_entropy(logits.reshape(-1, model.vocab_size), target, reduction="sum").item()
            count += target.numel()
    model.train()
    return total / max(count, 1)


def sample(model, length, temperature=1.0):
    """`length` ids drawn one at a time from zero state, the first uniformly from the vocabulary."""
    model.eval()
    out = [int(torch.randint(model.vocab_size, (1,)))]
    state, x = None, torch.tensor([[out[0]]])
    with torch.no_grad():
        for _ in range(length - 1):
            logits, state = model(x, state)
            p = torch.softmax(logits[0, 0] / temperature, dim=-1)
            x = torch.multinomial(p, 1).view(1, 1)
            out.append(int(x))
    model.train()
    return out


def dropout_at(args, step, windows_per_epoch):
    """charlstm.schedule.dropout_at: args.dropout reached by a straight ramp over the first
    args.dropout_warmup epochs."""
    if args.dropout_warmup <= 0:
        return args.dropout
    return args.dropout * min(1.0, step / (args.dropout_warmup * windows_per_epoch))


def lr_at(args, epoch):
    """charlstm.schedule.lr_at: the lr in force after `epoch` completed epochs."""
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optim]
    if args.lr_decay_every:
        decays = epoch // args.lr_decay_every
    else:
        decays = max(0, epoch - max(args.lr_decay_after, 1) + 1)
    return lr * args.lr_decay ** decays


def optimizer(args, params):
    lr = lr_at(args, 0)  # run() sets each step's from lr_at as well
    if args.optim == "adagrad":  # eps 1e-10 outside the root: charlstm's 1e-20 inside it (optim.py)
        return torch.optim.Adagrad(params, lr=lr)
    if args.optim == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=args.rmsprop_alpha, eps=1e-8)
    return torch.optim.Adam(params, lr=lr)


def validation_loss(model, val_ids, args):
    return evaluate(model, val_ids, args.val_streams or args.batch, args.seq)


def validate(model, val_ids, args, step, vocab):
    """Print the validation loss and a sample, as charlstm train does at every validation."""
    loss = validation_loss(model, val_ids, args)
    print(f"step={step} val_loss_nats={loss:.4f} val_bpc={loss / math.log(2):.4f}", flush=True)
    text = "".join(vocab[i] for i in sample(model, PREVIEW_CHARS, PREVIEW_TEMPERATURE))
    print(f"--- sample at step {step} (temperature {PREVIEW_TEMPERATURE}) ---\n{text}\n---", flush=True)
    return loss


def run(args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_ids, val_ids, vocab = load(args.corpus, args.val_frac)
    val_ids = val_ids[:VAL_MAX_CHARS]
    if args.dropout is None:
        args.dropout = 0.3 if args.mode == "train" else 0.0
    model = CharLSTM(len(vocab), args.hidden, args.layers, args.dropout)
    if args.mode == "sample":
        sample(model, 50)
        start = time.perf_counter()
        sample(model, args.length)
        print(f"sample_chars_per_s={args.length / (time.perf_counter() - start):.1f}")
        return
    opt = optimizer(args, model.parameters())
    x, y = streams(train_ids, args.batch)
    windows = x.shape[0] // args.seq  # per epoch
    if windows == 0:
        raise SystemExit(f"the training split has {len(train_ids)} chars, too few for one batch of "
                         f"{args.batch} x {args.seq}")
    state, step, seen = None, 0, 0
    start = deadline = None
    while True:
        if step == args.warmup:  # the clock starts after the warm-up steps
            start, seen = time.perf_counter(), 0
            if args.mode == "train":
                deadline = start + args.seconds
        inputs, targets, k = window(x, y, step, args.seq)
        if k == 0:  # an epoch starts from zero state
            state = None
        else:  # carry h, c; stop the gradients at the window boundary
            state = tuple(s.detach() for s in state)
        model.set_dropout(dropout_at(args, step, windows))
        for group in opt.param_groups:
            group["lr"] = lr_at(args, step // windows)
        logits, state = model(inputs, state)
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0 and args.clip_mode == "value":
            nn.utils.clip_grad_value_(model.parameters(), args.clip)
        elif args.clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        if step > args.warmup:
            seen += args.seq * args.batch
        if args.mode == "speed" and step >= args.warmup + args.steps:
            break
        if args.mode == "train" and args.eval_every and step % args.eval_every == 0:
            paused = time.perf_counter()
            validate(model, val_ids, args, step, vocab)
            if deadline:
                deadline += time.perf_counter() - paused
        if args.mode == "train" and args.max_steps and step >= args.max_steps:
            break
        if args.mode == "train" and deadline and time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - start if start is not None else float("nan")
    if args.mode == "speed":
        print(f"chars_per_s={seen / elapsed:.1f}")
    else:
        loss = validation_loss(model, val_ids, args)
        print(f"step={step} val_loss_nats={loss:.4f} val_bpc={loss / math.log(2):.4f} chars_seen={seen} "
              f"chars_per_s={seen / elapsed:.1f}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", choices=["speed", "train", "sample"])
    p.add_argument("corpus")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=50)
    p.add_argument("--seq", "--seq-length", dest="seq", type=int, default=50)
    p.add_argument("--optim", choices=list(DEFAULT_LR), default="rmsprop")
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 for rmsprop and adam, 0.02 for adagrad")
    p.add_argument("--rmsprop-alpha", type=float, default=0.95)
    p.add_argument("--lr-decay", type=float, default=0.85, help="lr factor at each decay; 1 is off")
    p.add_argument("--lr-decay-after", type=int, default=7, help="decay at every epoch end from epoch N on")
    p.add_argument("--lr-decay-every", type=int, default=0, help="instead: decay every N epochs (0: off)")
    p.add_argument("--clip", type=float, default=5.0, help="0 is off")
    p.add_argument("--clip-mode", choices=["value", "norm"], default="value")
    p.add_argument("--dropout", type=float, default=None, help="default: 0.3 in train, 0 in speed")
    p.add_argument("--dropout-warmup", type=float, default=20.0, help="epochs over which dropout ramps up from 0")
    p.add_argument("--val-frac", type=float, default=0.05)
    p.add_argument("--val-streams", type=int, default=1,
                   help="validation as this many streams, each from zero state (1: as charlstm; 0: --batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=50, help="speed: timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--seconds", type=float, default=600, help="train: wall-clock budget")
    p.add_argument("--max-steps", type=int, default=0, help="train: stop at this step (0: by --seconds only)")
    p.add_argument("--eval-every", type=int, default=0, help="train: validate and sample every N steps")
    p.add_argument("--length", type=int, default=2000, help="sample: chars to generate")
    return p


if __name__ == "__main__":
    run(parser().parse_args())
