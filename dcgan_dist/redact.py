"""Credentials out of everything that is saved or logged.

`data.shards` may carry a secret: a password in a URL (`https://user:pass@host/...`), a signed or
token URL (`?token=...`, `X-Amz-Signature=...`), or a header or variable written inline in a `pipe:`
command (`-H "Authorization: Bearer ..."`, `API_KEY=...`). The run itself uses the value as given;
`config.yaml`, `run.json`, the W&B config, the snapshot metadata and every message get `redact(value)`,
with each secret replaced by `***`. A reference to the environment (`$TOKEN`, `${TOKEN}`) is not a
secret and is kept: it is the way to keep a credential out of the config altogether.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://user:password@host or scheme://token@host: the userinfo part of a URL.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@'\"]*)(?::(?P<password>[^/\s@'\"]*))?@")
# ?a=1&b=2: every query-string value (signatures, tokens, keys: the names vary too much to list).
_QUERY_VALUE = re.compile(r"(?P<lead>[?&][^=&#\s'\"]+=)(?P<value>[^&#\s'\"]+)")
# Authorization: Bearer X / Basic X / token X, as a header or on its own.
_AUTH_SCHEME = re.compile(r"(?P<lead>\b(?:Bearer|Basic|Token|Digest)\s+)(?P<value>[^\s'\"]+)", re.IGNORECASE)
# NAME=value, NAME: value, --name=value, --name value, where NAME says it holds a credential.
_SECRET_NAME = r"[A-Za-z0-9_-]*(?:token|secret|passw(?:or)?d|pass|api[_-]?key|access[_-]?key|private[_-]?key" \
               r"|credential|signature|auth)[A-Za-z0-9_-]*"
_NAMED = re.compile(rf"(?P<lead>(?<![A-Za-z0-9_])-{{0,2}}{_SECRET_NAME}(?:\s*[:=]\s*|\s+(?=[^-\s])))"
                    rf"(?P<value>[^\s'\"&]+)", re.IGNORECASE)
# curl -u user:password, --user user:password.
_USER_FLAG = re.compile(r"(?P<lead>(?<!\S)(?:-u|--user)\s*[^\s:'\"]*:)(?P<value>[^\s'\"]+)")
# Credentials recognisable by their shape alone.
_SHAPES = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{20,}\b|\bgithub_pat_[A-Za-z0-9_]{20,}"
                     r"|\bhf_[A-Za-z0-9]{20,}\b|\bxox[abprs]-[A-Za-z0-9-]{10,}|\bsk-[A-Za-z0-9_-]{20,}"
                     r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


_AUTH_WORDS = ("bearer", "basic", "token", "digest")


def _keep_references(match: re.Match) -> str:
    value, lead = match.group("value"), match.group("lead")
    if value.startswith("$") or value == MASK or value.lower() in _AUTH_WORDS:
        return match.group(0)
    if re.search(r"(?:file|path|dir)\W*$", lead, re.IGNORECASE):      # --token-file PATH names a file, not a secret
        return match.group(0)
    return lead + MASK


def _userinfo(match: re.Match) -> str:
    user, password = match.group("user"), match.group("password")
    if password is None:                       # a bare token as the user: https://TOKEN@host
        return match.group("scheme") + (user if not user or user.startswith("$") else MASK) + "@"
    return match.group("scheme") + user + ":" + (password if password.startswith("$") else MASK) + "@"


def redact(text: str) -> str:
    """`text` with every credential it seems to hold replaced by ***."""
    if not isinstance(text, str) or not text:
        return text
    text = _USERINFO.sub(_userinfo, text)
    text = _QUERY_VALUE.sub(_keep_references, text)
    text = _AUTH_SCHEME.sub(_keep_references, text)
    text = _NAMED.sub(_keep_references, text)
    text = _USER_FLAG.sub(_keep_references, text)
    return _SHAPES.sub(MASK, text)


def redact_all(value: Any) -> Any:
    """A copy of a nested dict/list structure with every string redacted, for saving or logging."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_all(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_all(v) for v in value)
    return value
