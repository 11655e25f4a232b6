"""The schedules: the lr in force as a pure function of the completed epochs, and the dropout in
force as a pure function of the step, so a resumed run (which knows its step, hence its epoch)
continues both exactly, with nothing to save. No schedule touches the optimizer's state
(torch-rnn's restarts Adam's moments; ours does not).

    --lr-decay F --lr-decay-after A   char-rnn: lr *= F at the end of every epoch e >= A (e counts
                                      from 1, so A = 0 and A = 1 both decay at every epoch end)
    --lr-decay F --lr-decay-every N   torch-rnn's steps: lr *= F at the end of epochs N, 2N, 3N, ...

char-rnn's `-learning_rate_decay_after 10` (its default) is --lr-decay-after 10: the first decay
comes as epoch 10 ends. torch-rnn's loop applies its decay one step before the end of epochs N-1,
2N-1, ... and restarts Adam when it does; --lr-decay-every N decays as epochs N, 2N, ... end.

With none of them the run uses char-rnn's schedule with config.LR_DECAY from the end of epoch
config.LR_DECAY_AFTER; a factor or an epochs option alone takes the other from those defaults.
"""
from charlstm.config import LR_DECAY, LR_DECAY_AFTER


def lr_at(cfg, epoch):
    """The lr in force after `epoch` completed epochs (int >= 0) under TrainConfig cfg."""
    return cfg.lr * cfg.lr_decay ** decays_after(cfg, epoch)


def decays_after(cfg, epoch):
    """How many times the lr has been multiplied by cfg.lr_decay once `epoch` epochs are done."""
    if cfg.lr_decay_after is not None:
        return max(0, epoch - max(cfg.lr_decay_after, 1) + 1)
    if cfg.lr_decay_every is not None:
        return epoch // cfg.lr_decay_every
    return 0


def dropout_at(cfg, step, windows_per_epoch):
    """The dropout probability of step `step` (0-based): cfg.dropout, reached by a straight ramp
    from 0 over the first cfg.dropout_warmup epochs (--dropout-warmup). Early on the model
    underfits and dropout only slows it; once it starts to overfit, dropout pays (docs/training.md)."""
    if cfg.dropout_warmup <= 0:
        return cfg.dropout
    return cfg.dropout * min(1.0, step / (cfg.dropout_warmup * windows_per_epoch))


def schedule_problem(after, every):
    """What is wrong with the --lr-decay options given (None for one not given), as one line; None
    if nothing. The ranges (factor in (0, 1], epochs >= 0 or >= 1) are click's to check."""
    if after is not None and every is not None:
        return ("--lr-decay-after (char-rnn's schedule) and --lr-decay-every (torch-rnn's) are two "
                "schedules: give only one")
    return None


def fill_schedule(lr_decay, after, every):
    """(factor, after, every) a new run uses from the --lr-decay options given (None for one not
    given): the default schedule where no epochs option is given, the default factor where no factor
    is. --lr-decay 1 is no decay."""
    if after is None and every is None:
        after = LR_DECAY_AFTER
    return (LR_DECAY if lr_decay is None else lr_decay), after, every
