"""Validation loss: the validation split read as one stream from zero state, on its own state.

It never touches the training streams' h and c. It is `charlstm eval`'s scorer run over the split;
long splits are scored on a bounded prefix (VAL_MAX_CHARS), and the output says how many
characters were scored.
"""
from charlstm.evaluate import Scorer

VAL_MAX_CHARS = 200_000


def validation_loss(params, config, val_ids):
    """Mean nats over the predictions of positions 2..n of val_ids[:VAL_MAX_CHARS] from zero state.
    Returns (loss, chars scored), or (None, 0) when there is nothing to score."""
    scorer = Scorer(params, config)
    scorer.feed(val_ids[:VAL_MAX_CHARS])
    if scorer.count == 0:
        return None, 0
    return scorer.score(), scorer.count
