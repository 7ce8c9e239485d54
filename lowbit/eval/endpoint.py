"""A served model named on the command line: `openai+http://HOST:PORT/v1#MODEL` (or `openai+https://…`).

The part after `openai+` up to `#` is the base URL of an OpenAI-compatible API (the one that ends in `/v1`); the part
after `#` is the model name the server knows (its `GET /v1/models` list). Without `#MODEL`, a server that serves one
model is asked for its name. An API key is never part of the spec: it is read from the environment variable that
`--api-key-env` names, so that it is neither printed nor saved with the results.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from lowbit.errors import LowbitError
from lowbit.model.sources import SERVED_PREFIX as PREFIX
from lowbit.model.sources import is_served as is_endpoint


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000/v1, without a trailing slash
    model: str | None  # the served model's name; None: the only one the server lists

    def __str__(self) -> str:
        return f"{PREFIX}{self.base_url}" + (f"#{self.model}" if self.model else "")


def parse_endpoint(text: str) -> Endpoint:
    """`openai+http(s)://host[:port]/path#model` → Endpoint; anything else is refused with the expected form."""
    spec = text.strip()
    if not is_endpoint(spec):
        raise LowbitError(f"{text!r} is not a served model; write it as openai+http://HOST:PORT/v1#MODEL.")
    url, _, model = spec[len(PREFIX):].partition("#")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LowbitError(f"{text!r}: expected openai+http://HOST:PORT/v1#MODEL or openai+https://…; the part after "
                          f"'openai+' must be an http or https URL with a host.")
    if parts.username or parts.password:
        raise LowbitError(f"the served model's URL holds credentials; they would be printed and saved with the "
                          f"results. Put the API key in an environment variable and name it with --api-key-env "
                          f"(the URL: {parts.scheme}://{parts.hostname}…).")
    if parts.query:
        raise LowbitError(f"{text!r}: the URL of a served model takes no query string; give the base URL of the API "
                          f"(e.g. http://127.0.0.1:8000/v1).")
    try:
        parts.port  # noqa: B018  (a bad port raises here)
    except ValueError:
        raise LowbitError(f"{text!r}: the port is not a number between 0 and 65535.") from None
    return Endpoint(url.rstrip("/"), unquote(model) or None)
