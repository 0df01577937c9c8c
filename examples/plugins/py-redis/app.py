"""A tern certificate plugin in Python, built into a Wasm component with componentize-py (contract 0.2).

It does what the shipped Rust Redis plugin does in its default layout: `GET <name>.crt` and `GET <name>.key`
(one MGET through the host's key-value capability), then the same for `*.<parent>` when the exact name has
nothing, and an optional TTL key passed on as the cache hint. The same MGET reads an optional route key beside
them, holding one line: `pool NAME` (an `[[upstream]]` of the host), `origin http://host:port` (or https), or
`passthrough host:port` (tern forwards the connection untouched; no certificate needed). Without it, the
listener's backend. The host checks every route against the plugin's `grants.routes`.
Kept small as an example: unlike the Rust plugin it reads no RSA member, and a route applies to the
certificate stored beside it only (the Rust plugin applies an exact name's route to a wildcard certificate too).

Settings (the plugin's `settings` table in tern.toml; all optional):
  cert_key = "{name}.crt"   key_key = "{name}.key"   ttl_key (unset: no TTL)   wildcard = "true"
  route_key (unset: beside the certificate, `cert_key` up to and including `{name}`, then `.route`: so
  `{name}.route` by default, and `cert:{name}.route` for `cert:{name}.crt`, inside the prefixes of `grants.kv`
  that already let the plugin read the certificate)

WIT to Python, as componentize-py maps it: the world is the class `WitWorld` with a `select_certificate` method
taking the `hello` record as a dataclass (`Hello(servername, listener)`); record fields are snake_case
(`private-key` is `private_key`); a `result` is returned by returning its ok value and failed by raising
`Err(value)`; a `variant` case is a dataclass named after the variant and the case, holding its payload
(`Answer_Serve(Served([Certificate(...)], Route_Origin(url), ttl))`, `Answer_NotFound()`); an `option` is the
value or `None`; a `list` is a `list`, except `list<u8>`, which is `bytes`.
"""

from typing import Optional, Tuple

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, kv, log
from wit_world.imports.types import (
    Answer,
    Answer_NotFound,
    Answer_Passthrough,
    Answer_Serve,
    Certificate,
    Hello,
    Passthrough,
    Route,
    Route_Origin,
    Route_Pool,
    Served,
)

U32_MAX = 2**32 - 1


def describe(error: object) -> str:
    value = getattr(error, "value", error)
    kind = {kv.Error_Denied: "denied", kv.Error_Unavailable: "unavailable", kv.Error_Other: "error"}
    label = kind.get(type(value))
    return f"key-value store {label}: {value.value}" if label else str(value)


def text(raw: bytes, what: str, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Err(f"{what} of {name} is not UTF-8 PEM")


def parse_route(raw: str, name: str) -> Tuple[Optional[Route], Optional[str]]:
    """What a route value says: (route, None), or (None, target) for `passthrough HOST:PORT`. The first line that
    is neither blank nor a `#` comment counts, as in the file-path plugin's route files."""
    lines = (line.strip() for line in raw.splitlines())
    line = next((line for line in lines if line and not line.startswith("#")), "")
    parts = line.split(None, 1)
    kind, value = parts if len(parts) == 2 else ("", "")
    if kind == "pool":
        return Route_Pool(value), None
    if kind == "origin":
        return Route_Origin(value), None
    if kind == "passthrough":
        return None, value
    raise Err(f"route of {name}: expected `pool NAME`, `origin URL` or `passthrough HOST:PORT`, got {line!r}")


def route_beside(cert_key: str) -> str:
    """The default route key template: `cert_key` up to and including `{name}`, then `.route`."""
    head, found, _ = cert_key.partition("{name}")
    return f"{head}{found}.route" if found else "{name}.route"


def fetch(name: str) -> Optional[Answer]:
    """The answer stored for `name`, or None if it has no passthrough route and its chain or key is missing."""
    fill = lambda template: template.replace("{name}", name)  # noqa: E731
    cert_key = config.get("cert_key") or "{name}.crt"
    keys = [
        fill(cert_key),
        fill(config.get("key_key") or "{name}.key"),
        fill(config.get("route_key") or route_beside(cert_key)),
    ]
    ttl_key = config.get("ttl_key")
    if ttl_key is not None:
        keys.append(fill(ttl_key))
    try:
        values = kv.get_many(keys)
    except Err as error:
        raise Err(describe(error))
    chain, key, route = values[0], values[1], values[2]
    served_route, passthrough = (None, None) if route is None else parse_route(text(route, "route", name), name)
    if passthrough is None and (chain is None or key is None):
        return None
    ttl_seconds = None
    if len(values) > 3 and values[3] is not None:
        raw = text(values[3], "ttl", name).strip()
        if not (raw.isascii() and raw.isdigit()):
            raise Err(f"ttl of {name}: expected whole seconds, got {raw!r}")
        ttl_seconds = min(int(raw), U32_MAX)  # what WIT's u32 holds; the host caps the TTL anyway
    if passthrough is not None:
        return Answer_Passthrough(Passthrough(passthrough, ttl_seconds))
    certificate = Certificate(text(chain, "certificate", name), text(key, "key", name))
    return Answer_Serve(Served([certificate], served_route, ttl_seconds))


def wildcard_of(name: str) -> Optional[str]:
    """`*.<parent>` for a name with at least two labels under the wildcard (`*.com` is never valid)."""
    _, dot, parent = name.partition(".")
    return f"*.{parent}" if dot and "." in parent else None


class WitWorld(wit_world.WitWorld):
    def select_certificate(self, hello: Hello) -> Answer:
        found = fetch(hello.servername)
        pattern = wildcard_of(hello.servername)
        if found is None and (config.get("wildcard") or "true") == "true" and pattern is not None:
            found = fetch(pattern)
            if found is not None:
                log.log(log.Level.DEBUG, f"serving wildcard {pattern}")
        return Answer_NotFound() if found is None else found
