"""Checking request bodies field by field: every problem is an ApiError naming the field, the rule and the limit.

The routes read bodies as plain JSON objects (no schema library), so each message says exactly what to fix, e.g.
`max_output_tokens must be an integer >= 1, got 0` with param "max_output_tokens".
"""
from __future__ import annotations

import math
from typing import Any


class ApiError(Exception):
    """status (4xx/5xx), message, param: the offending field (None when it is the whole body)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param)


def integer(body: dict, name: str, default: int | None, low: int | None = None, high: int | None = None,
            required: bool = False) -> int | None:
    if name not in body or body[name] is None:
        if required:
            raise bad(name, f"{name} is required")
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(name, f"{name} must be an integer, got {type(value).__name__} {value!r:.40}")
    if low is not None and value < low:
        raise bad(name, f"{name} must be an integer >= {low}, got {value}")
    if high is not None and value > high:
        raise bad(name, f"{name} must be an integer <= {high}, got {value}")
    return value


def number(body: dict, name: str, default: float | None, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float | None:
    if name not in body or body[name] is None:
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"{name} must be a finite number, got {value!r:.40}")
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    if low is not None and (value < low or (low_open and value == low)):
        raise bad(name, f"{name} must be in {interval}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise bad(name, f"{name} must be in {interval}, got {value}")
    return float(value)


def boolean(body: dict, name: str, default: bool) -> bool:
    if name not in body or body[name] is None:
        return default
    if not isinstance(body[name], bool):
        raise bad(name, f"{name} must be true or false, got {body[name]!r:.40}")
    return body[name]


def stop_strings(body: dict, name: str = "stop") -> tuple[str, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise bad(name, f"{name} must be a non-empty string or a list of non-empty strings")
    return tuple(value)


def sampling(body: dict, default_temperature: float) -> dict[str, Any]:
    """temperature, top_p, top_k, seed, expert_threshold (OpenAI names; top_k and expert_threshold are ours)."""
    return {"temperature": number(body, "temperature", default_temperature, 0.0, None),
            "top_p": number(body, "top_p", None, 0.0, 1.0, low_open=True),
            "top_k": integer(body, "top_k", None, 1),
            "seed": integer(body, "seed", None, -2**63, 2**64 - 1),
            "expert_threshold": number(body, "expert_threshold", None, 0.0, 1.0, high_open=True),
            "logit_bias": logit_bias(body)}


def logit_bias(body: dict) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}."""
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad("logit_bias", "logit_bias must be an object mapping token ids to numbers in [-100, 100]")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad("logit_bias", f"logit_bias key {key!r} is not a token id") from None
        number({"logit_bias": bias}, "logit_bias", None, -100.0, 100.0)
        out[token] = float(bias)
    return out


def object_body(raw: bytes) -> dict:
    import json
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body
