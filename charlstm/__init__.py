"""charlstm: character-level LSTM language models on the CPU, hot loops compiled with Numba."""

__version__ = "0.1.0"
