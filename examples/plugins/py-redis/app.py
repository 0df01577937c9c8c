"""A tern certificate plugin in Python, built into a Wasm component with componentize-py.

It does what the shipped Rust Redis plugin does in its default layout: `GET <name>.crt` and `GET <name>.key`
(one MGET through the host's key-value capability), then the same for `*.<parent>` when the exact name has
nothing, and an optional TTL key passed on as the cache hint.

Settings (the plugin's `settings` table in tern.toml; all optional):
  cert_key = "{name}.crt"   key_key = "{name}.key"   ttl_key (unset: no TTL)   wildcard = "true"

WIT to Python, as componentize-py maps it: the world is the class `WitWorld` with a `select_certificate` method;
a `result` is returned by returning its ok value and failed by raising `Err(value)`; a `variant` case is a
dataclass (`Selection_Found(Certificate(...))`); an `option` is the value or `None`; `list<u8>` is `bytes`.
"""

from typing import Optional

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, kv, log
from wit_world.imports.types import Certificate, Selection, Selection_Found, Selection_NotFound


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


def fetch(name: str) -> Optional[Certificate]:
    """The certificate stored for `name`, or None if its chain or key is missing."""
    fill = lambda template: template.replace("{name}", name)  # noqa: E731
    keys = [fill(config.get("cert_key") or "{name}.crt"), fill(config.get("key_key") or "{name}.key")]
    ttl_key = config.get("ttl_key")
    if ttl_key is not None:
        keys.append(fill(ttl_key))
    try:
        values = kv.get_many(keys)
    except Err as error:
        raise Err(describe(error))
    chain, key = values[0], values[1]
    if chain is None or key is None:
        return None
    ttl_seconds = None
    if len(values) > 2 and values[2] is not None:
        raw = text(values[2], "ttl", name).strip()
        if not raw.isdigit():
            raise Err(f"ttl of {name}: expected whole seconds, got {raw!r}")
        ttl_seconds = int(raw)
    return Certificate(text(chain, "certificate", name), text(key, "key", name), ttl_seconds)


def wildcard_of(name: str) -> Optional[str]:
    """`*.<parent>` for a name with at least two labels under the wildcard (`*.com` is never valid)."""
    _, dot, parent = name.partition(".")
    return f"*.{parent}" if dot and "." in parent else None


class WitWorld(wit_world.WitWorld):
    def select_certificate(self, servername: str) -> Selection:
        found = fetch(servername)
        pattern = wildcard_of(servername)
        if found is None and (config.get("wildcard") or "true") == "true" and pattern is not None:
            found = fetch(pattern)
            if found is not None:
                log.log(log.Level.DEBUG, f"serving wildcard {pattern}")
        return Selection_NotFound() if found is None else Selection_Found(found)
