"""The completion API's requests and errors, in OpenAI's shape as llama.cpp serves it, character-level.

`parse_completion` turns a request body into a Completion or raises ApiError, whose code is the
HTTP status and whose message names the field at fault. Nothing here knows HTTP or the engine.
"""
import json
import math
from dataclasses import dataclass, field

from charlstm.sample import show_chars

BODY_LIMIT = 1 << 20  # bytes of a request body
MAX_STOPS = 4  # stop strings, as OpenAI's API allows
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 503: "unavailable_error",
               500: "server_error"}
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stream", "n", "echo",
          "user"}
DEFAULT_MAX_TOKENS = 256


class ApiError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message

    def body(self):
        return error_body(self.code, self.message)


def error_body(code, message):
    return {"error": {"code": code, "message": message, "type": ERROR_TYPES.get(code, "invalid_request_error")}}


@dataclass
class Completion:
    prompt: str = ""
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0  # 0: the most likely character every time
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: fresh entropy
    stop: list = field(default_factory=list)
    stream: bool = False
    echo: bool = False


def read_body(raw):
    """The JSON object a request body holds."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object such as {\"prompt\": \"ROMEO:\"}")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _integer(body, name, lo, hi=None):
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise ApiError(400, f"'{name}' must be an integer {bound}, got {json.dumps(value)}")
    return value


def _number(body, name, ok, wanted):
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ApiError(400, f"'{name}' must be {wanted}, got {json.dumps(value)}")
    return float(value)


def _boolean(body, name):
    if not isinstance(body[name], bool):
        raise ApiError(400, f"'{name}' must be true or false, got {json.dumps(body[name])}")
    return body[name]


def _stops(value):
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of 1 to {MAX_STOPS} of them, "
                            f"got {json.dumps(value)}")
    return stops


def parse_completion(body, model_name, vocab, max_tokens_limit):
    """A Completion from a request body (a dict), checked against the model and the server's limit."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(400, f"unsupported field(s): {', '.join(unknown)}; this server takes "
                            f"{', '.join(sorted(FIELDS))}")
    if "n" in body and (isinstance(body["n"], bool) or body["n"] != 1):
        raise ApiError(400, f"'n' must be 1 (one completion per request), got {json.dumps(body['n'])}")
    if "model" in body and body["model"] != model_name:
        raise ApiError(400, f"'model' {json.dumps(body['model'])} is not served here; this server has "
                            f"{json.dumps(model_name)}")
    c = Completion()
    if "prompt" in body:
        c.prompt = body["prompt"]
        if isinstance(c.prompt, list) and len(c.prompt) == 1:
            c.prompt = c.prompt[0]
        if not isinstance(c.prompt, str):
            raise ApiError(400, f"'prompt' must be a string, got {json.dumps(body['prompt'])[:80]}")
        missing = set(c.prompt) - set(vocab)
        if missing:
            raise ApiError(400, f"'prompt' has {sum(ch in missing for ch in c.prompt)} character(s) not in the "
                                f"model's vocabulary: {show_chars(missing)}")
    if "max_tokens" in body:
        c.max_tokens = _integer(body, "max_tokens", 0, max_tokens_limit)
    if "temperature" in body:
        c.temperature = _number(body, "temperature", lambda v: v >= 0, "a number >= 0 (0: always the most likely)")
    if "top_k" in body:
        c.top_k = _integer(body, "top_k", 0)
    if "top_p" in body:
        c.top_p = _number(body, "top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
    if "seed" in body:
        c.seed = _integer(body, "seed", 0, 2 ** 63 - 1)
    if body.get("stop") is not None:
        c.stop = _stops(body["stop"])
    for flag in ("stream", "echo"):
        if flag in body:
            setattr(c, flag, _boolean(body, flag))
    return c
