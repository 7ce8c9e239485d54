"""A small client of an OpenAI-compatible HTTP API: JSON over HTTP(S) with a timeout, an API key, and retries.

Retry policy: a failed connection (refused, reset, closed before the answer), a timeout, an answer cut short, and
the answers 408, 429 and 5xx are retried with exponential backoff — 0.5 s, 1 s, 2 s, … (doubling, at most 30 s
apart, with up to 10% jitter; a `Retry-After` header is honoured within that cap) — until `RetryPolicy.total`
seconds of waiting are used up (180 s by default); each retry writes one warning line (logger `lowbit.eval.served`).
A 5xx answer that the caller recognizes as permanent (`permanent`, e.g. a server that cannot give log-probs) and
every other 4xx answer are returned at once as `APIError`; a connection that never comes back raises `Unreachable`.
The timeout bounds the connection and each wait for data (urllib's socket timeout), not a whole answer.

The API key goes only into the `Authorization: Bearer` header: it is not part of any message, and is blanked out of
the server's messages before they are passed on.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("lowbit.eval.served")

RETRIED_STATUS = (408, 429)


class APIError(Exception):
    """The server answered, and the answer is an error that retrying does not cure (or retries ran out)."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"{url} answered {status}: {message}")
        self.status, self.message, self.url = status, message, url
        self.retry_after: float | None = None
        self.retries, self.waited = 0, 0.0


class Unreachable(Exception):
    """No answer: the connection failed or timed out (after the retries, if any)."""

    def __init__(self, reason: str, url: str):
        super().__init__(f"{url}: {reason}")
        self.reason, self.url = reason, url
        self.retries, self.waited = 0, 0.0


@dataclass(frozen=True)
class RetryPolicy:
    first_wait: float = 0.5
    max_wait: float = 30.0
    total: float = 180.0  # seconds of waiting, summed over the retries of one request

    def __post_init__(self) -> None:
        if self.first_wait <= 0 or self.max_wait < self.first_wait or self.total < 0:
            raise ValueError(f"bad retry policy {self}")


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300.0,
                 retry: RetryPolicy = RetryPolicy()):
        self.base_url = base_url.rstrip("/")
        self._key = api_key or None
        self.timeout = timeout
        self.retry = retry

    def get(self, path: str, *, retry: bool = True) -> dict:
        return self._request("GET", path, None, None, retry)

    def post(self, path: str, body: dict, *, permanent: Callable[[int, str], bool] | None = None,
             retry: bool = True) -> dict:
        return self._request("POST", path, body, permanent, retry)

    def _request(self, method: str, path: str, body: dict | None, permanent, retry: bool) -> dict:
        url = f"{self.base_url}/{path.lstrip('/')}"
        waited, attempt = 0.0, 0
        while True:
            try:
                return self._once(method, url, body)
            except (APIError, Unreachable) as e:
                if not (retry and _transient(e, permanent)):
                    raise
                error = e
            wait = min(self.retry.max_wait, self.retry.first_wait * 2**attempt) * (1 + 0.1 * random.random())
            if getattr(error, "retry_after", None) is not None:
                wait = min(self.retry.max_wait, max(wait, error.retry_after))
            if waited + wait > self.retry.total:
                log.warning("%s %s: %s; giving up after %d retries (%.0f s of waiting).", method, url,
                            _what(error), attempt, waited)
                error.retries, error.waited = attempt, waited
                raise error
            attempt += 1
            log.warning("%s %s: %s; retry %d in %.1f s (%.0f of %.0f s of waiting allowed used).", method, url,
                        _what(error), attempt, wait, waited, self.retry.total)
            time.sleep(wait)
            waited += wait

    def _once(self, method: str, url: str, body: dict | None) -> dict:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            text = self._clean(e.read().decode("utf-8", errors="replace"))
            error = APIError(e.code, _message(text), url)
            retry_after = e.headers.get("Retry-After") if e.headers else None
            error.retry_after = float(retry_after) if retry_after and retry_after.isdigit() else None
            raise error from None
        except urllib.error.URLError as e:
            raise Unreachable(_reason(e.reason), url) from None
        except TimeoutError:
            raise Unreachable(f"no answer within the timeout of {self.timeout:g} s", url) from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise Unreachable(_reason(e), url) from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise APIError(200, f"the answer is not JSON: {self._clean(raw[:200].decode(errors='replace'))!r}",
                           url) from None

    def _clean(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _transient(e: APIError | Unreachable, permanent) -> bool:
    if isinstance(e, Unreachable):
        return True
    if e.status in RETRIED_STATUS or e.status == 200:  # 200: an answer cut short (not JSON)
        return True
    return e.status >= 500 and not (permanent is not None and permanent(e.status, e.message))


def _what(e: APIError | Unreachable) -> str:
    return e.reason if isinstance(e, Unreachable) else f"answered {e.status} ({_short(e.message)})"


def _message(text: str) -> str:
    """The error message of an OpenAI-style error body ({"error": {"message": …}} or {"detail": …}), else the text."""
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text.strip()[:500]
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message", error)
        if error is not None:
            return str(error)[:2000]
    return text.strip()[:500]


def _reason(e: object) -> str:
    if isinstance(e, TimeoutError):
        return "no answer within the timeout"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(e, socket.gaierror):
        return f"unknown host ({e})"
    return f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else str(e)


def _short(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
