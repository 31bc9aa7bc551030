"""Secrets out of messages: `redact` masks every password a DSN or an error text may carry.
Pure text, used wherever a message may quote a DSN, a URL or a client's error."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

# `user:password@` in a URL or a scheme-less `user:password@host:port`: the user is kept. The
# password runs to the last `@` before the host, so one holding `@` or `:` is masked whole.
_USERINFO = re.compile(r"(?P<user>[^\s/@:'\"]*):(?P<password>[^\s/'\"]*)@")
# A query parameter or `name=value` whose name looks secret (password, passwd, pwd, secret,
# token, access_token, api_key, auth, credentials...).
_SECRET_PARAM = re.compile(
    r"(?P<name>(?:^|(?<=[?&;\s,(]))[A-Za-z0-9_.-]*(?:pass|pwd|secret|token|key|auth|cred)"
    r"[A-Za-z0-9_.-]*=)(?P<value>[^&;\s'\",)#]*)",
    re.IGNORECASE,
)
_SHORTEST_SECRET = 4  # a shorter known secret is not replaced wherever its letters occur


def redact(text: str, *, secrets: Iterable[str | None] = ()) -> str:
    """A DSN, or any message quoting one, with every password in it masked: the password of
    `scheme://user:password@` and of a scheme-less `user:password@host:port`, the value of a
    secret-looking parameter (`?password=`, `access_token=`, ...), and each of `secrets` (the
    password from the environment or a file) wherever it appears, plain or URL-encoded."""
    shown = _USERINFO.sub(lambda m: f"{m['user']}:***@", text)
    shown = _SECRET_PARAM.sub(lambda m: f"{m['name']}***", shown)
    for secret in secrets:
        if secret and len(secret) >= _SHORTEST_SECRET:
            for form in {secret, quote(secret, safe=""), quote_plus(secret)}:
                shown = shown.replace(form, "***")
    return shown
