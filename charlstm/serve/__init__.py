"""`charlstm serve`: a model on a web page and behind an OpenAI-style HTTP API (the serve extra).

    source.py   what is served: a checkpoint, or a run folder's newest best.npz, reloaded as it trains
    batcher.py  the engine thread: every active completion one character a step, as one batch
    api.py      the completion request's fields, checked, and the error shape
    app.py      the HTTP side (aiohttp): routes, key, server-sent events, metrics
    page/       the built-in page (plain HTML, CSS and JavaScript; no network needed)
"""
