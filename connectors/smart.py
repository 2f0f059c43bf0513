"""Auth strategies for FHIR servers: none, bearer, client-credentials, SMART Backend Services.

Each strategy is a small object with ``headers()`` and ``invalidate()`` that the shared HTTP
client composes (Meltano SDK's ``authenticators.py`` style). Token-fetching strategies cache the
access token until shortly before ``expires_in`` runs out, behind a lock so the attachment and
hydration threads share one token; on a 401 the client calls ``invalidate()`` once and retries.

SMART Backend Services (https://hl7.org/fhir/smart-app-launch/backend-services.html): the client
signs a short-lived JWT (``iss``=``sub``=client id, ``aud``=token URL, ``exp`` <= 5 minutes,
unique ``jti``, header ``kid``) with its private key (RS384 or ES384) and posts it as a
``client_assertion`` in a ``client_credentials`` grant. Tokens and assertions are never logged.

Scopes (``scope = "auto"``, the default): SMART v1 spells read access ``system/*.read``, v2
``system/*.rs``, and a server may accept only one. The scopes are chosen from
``.well-known/smart-configuration`` (``capabilities`` ``permission-v1``/``permission-v2`` and the
syntax of ``scopes_supported``): v1 first when it is advertised, else v2. When the token
endpoint refuses the scope (403, or ``invalid_scope``), or the FHIR server answers 403 to the
token, the other advertised version is asked for once. A scope given explicitly is sent as is.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from aggregator.errors import AuthError, ConfigError, ConnectorError
from connectors.http import HttpClient, NoAuth, mask_url, parse_json_object
from connectors.secrets import read_private_key, read_secret

log = logging.getLogger(__name__)

AUTH_MODES = ("none", "bearer", "client-credentials", "smart-backend")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: SMART caps the assertion lifetime at five minutes; we use less to allow for clock skew.
ASSERTION_LIFETIME = 240
#: Refresh this many seconds before the server's expiry, so a token never dies mid-request.
EXPIRY_MARGIN = 30.0

#: (url, form fields, HTTP basic credentials or None) -> parsed JSON token response
TokenPoster = Callable[[str, Mapping[str, str], "tuple[str, str] | None"], Mapping[str, Any]]

SCOPE_AUTO = "auto"
#: Read access to everything, in SMART v1 and v2 syntax.
SCOPE_V1 = "system/*.read"
SCOPE_V2 = "system/*.rs"
_V2_SCOPE = re.compile(r"^(patient|user|system)/[^.\s]+\.c?r?u?d?s?(\?\S*)?$")
_V1_SCOPE = re.compile(r"^(patient|user|system)/[^.\s]+\.(read|write|\*)$")


def advertised_scopes(smart_config: Mapping[str, Any] | None) -> list[str]:
    """Read scopes to try, in order, from a ``.well-known/smart-configuration`` document.

    v1 (``system/*.read``) first when the server advertises it - the form most servers accept -
    then v2 (``system/*.rs``). A document that says neither (or none at all) gives both."""
    if not smart_config:
        return [SCOPE_V1, SCOPE_V2]
    caps = {str(c) for c in smart_config.get("capabilities") or [] if isinstance(c, str)}
    supported = [str(x) for x in smart_config.get("scopes_supported") or [] if isinstance(x, str)]
    v1 = "permission-v1" in caps or any(_V1_SCOPE.match(x) for x in supported)
    v2 = "permission-v2" in caps or any(_V2_SCOPE.match(x) and not _V1_SCOPE.match(x) for x in supported)
    if not v1 and not v2:
        return [SCOPE_V1, SCOPE_V2]
    return [x for x, ok in ((SCOPE_V1, v1), (SCOPE_V2, v2)) if ok]


class ScopeChoice:
    """The scope a token is asked for: the configured one, or the advertised ones in turn.

    ``discover`` fetches ``.well-known/smart-configuration`` (None when there is none); it is
    called only when the choice is needed - at once when the document is already known, else
    on the first refusal - so a server that accepts the first scope costs no extra request."""

    def __init__(self, configured: str, discover: Callable[[], Mapping[str, Any] | None] | None = None,
                 known: Mapping[str, Any] | None = None) -> None:
        self.auto = configured == SCOPE_AUTO
        self._discover = discover
        self._discovered = known is not None or not self.auto
        self.candidates = advertised_scopes(known) if self.auto and known is not None else \
            [SCOPE_V1] if self.auto else [configured]
        self.index = 0
        #: scopes a token was refused for (by the token endpoint or the FHIR server)
        self.refused: list[str] = []

    @property
    def current(self) -> str:
        return self.candidates[self.index]

    def advance(self) -> bool:
        """Move to the next advertised scope; False when there is none (or it was configured)."""
        if not self.auto:
            return False
        if not self._discovered:
            self._discovered = True
            try:
                doc = self._discover() if self._discover else None
            except ConnectorError:
                doc = None
            self.candidates = [self.current, *(c for c in advertised_scopes(doc) if c != self.current)]
        if self.index + 1 >= len(self.candidates):
            return False
        self.refused.append(self.current)
        self.index += 1
        return True

    def back(self) -> None:
        """Return to the previous scope (its successor was refused too)."""
        if self.index > 0:
            self.index -= 1


class BearerAuth:
    """A static token read from an environment variable or a file (already issued elsewhere)."""

    name = "bearer"

    def __init__(self, token: str) -> None:
        self._token = token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> None:
        # A static token cannot be refreshed; the retried request will get the 401 again.
        pass


class _TokenCache:
    """Thread-safe access-token cache shared by the OAuth strategies."""

    name = "oauth"

    def __init__(self, token_url: str, scope: str | ScopeChoice, poster: TokenPoster) -> None:
        self.token_url = token_url
        self.scopes = scope if isinstance(scope, ScopeChoice) else ScopeChoice(scope)
        self._post = poster
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0
        #: number of token requests made; tests assert the cache works
        self.fetches = 0

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def invalidate(self) -> None:
        with self._lock:
            self._token = None
            self._expires_at = 0.0

    @property
    def scope(self) -> str:
        """The scope the current token is (or the next one will be) asked for."""
        return self.scopes.current

    def token(self) -> str:
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._fetch()
            assert self._token is not None
            return self._token

    def rescope(self) -> bool:
        """After a 403 from the FHIR server: get a token for the next advertised scope.

        True when there is one and the token endpoint granted it (the caller sends the request
        again); otherwise the old token and scope stay and the 403 stands."""
        with self._lock:
            saved = (self._token, self._expires_at)
            before = self.scope
            if not self.scopes.advance():
                return False
            try:
                self._fetch_one()
            except ConnectorError:
                self.scopes.back()
                self._token, self._expires_at = saved
                return False
            log.info("403 with scope %s: now using scope %s", before, self.scope)
            return True

    def _form(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        raise NotImplementedError

    def _fetch(self) -> None:
        """A token for the current scope, or the next advertised one when it is refused."""
        while True:
            try:
                self._fetch_one()
                return
            except AuthError as exc:
                refused = exc.status == 403 or "invalid_scope" in exc.message
                before = self.scope
                if not refused or not self.scopes.advance():
                    raise
                log.info("token request for scope %s refused (HTTP %s); asking for %s", before, exc.status,
                         self.scope)

    def _fetch_one(self) -> None:
        form, basic = self._form()
        data = self._post(self.token_url, form, basic)
        self.fetches += 1
        token = data.get("access_token")
        if not isinstance(token, str) or not token:
            raise AuthError("token response has no access_token", item=mask_url(self.token_url))
        token_type = str(data.get("token_type") or "bearer")
        if token_type.lower() != "bearer":
            raise AuthError(f"unsupported token_type {token_type!r}", item=mask_url(self.token_url))
        try:
            lifetime = float(data.get("expires_in") or 300)
        except (TypeError, ValueError):
            lifetime = 300.0
        self._token = token
        self._expires_at = time.monotonic() + max(1.0, lifetime - EXPIRY_MARGIN)
        log.info("obtained an access token from %s (expires in %ds)", mask_url(self.token_url), int(lifetime))


class ClientCredentialsAuth(_TokenCache):
    """OAuth2 ``client_credentials`` with a client secret (HTTP Basic, RFC 6749 2.3.1)."""

    name = "client-credentials"

    def __init__(self, token_url: str, client_id: str, client_secret: str, scope: str | ScopeChoice,
                 poster: TokenPoster) -> None:
        super().__init__(token_url, scope, poster)
        self.client_id = client_id
        self._secret = client_secret

    def _form(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        return form, (self.client_id, self._secret)


class SmartBackendAuth(_TokenCache):
    """SMART Backend Services: a signed JWT client assertion instead of a secret."""

    name = "smart-backend"

    def __init__(
        self,
        token_url: str,
        client_id: str,
        private_key_pem: bytes,
        *,
        kid: str | None,
        alg: str,
        scope: str | ScopeChoice,
        poster: TokenPoster,
    ) -> None:
        super().__init__(token_url, scope, poster)
        if alg not in ("RS384", "ES384"):
            raise ConfigError(f"unsupported signing algorithm {alg!r}: use RS384 or ES384")
        try:
            key = load_pem_private_key(private_key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load the private key ({type(exc).__name__}); give an unencrypted PEM")
        if alg == "RS384" and not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError("RS384 needs an RSA private key")
        if alg == "ES384" and not (isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"):
            raise ConfigError("ES384 needs an EC P-384 private key")
        self.client_id = client_id
        self.kid = kid
        self.alg = alg
        self._key = key

    def assertion(self, now: float | None = None) -> str:
        """A fresh signed client assertion (new ``jti`` each time, ``exp`` within 5 minutes)."""
        issued = int(now if now is not None else time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "jti": uuid.uuid4().hex,
            "iat": issued,
            "exp": issued + ASSERTION_LIFETIME,
        }
        headers = {"typ": "JWT", **({"kid": self.kid} if self.kid else {})}
        return jwt.encode(claims, self._key, algorithm=self.alg, headers=headers)  # type: ignore[arg-type]

    def _form(self) -> tuple[dict[str, str], tuple[str, str] | None]:
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(),
        }
        return form, None


# --- wiring ---------------------------------------------------------------------------------


def token_poster(client: HttpClient) -> TokenPoster:
    """Post a token request through ``client`` (timeouts, error mapping) without a bearer token.

    A token request creates no server state, so a dropped connection may be retried; a 400/401
    from the token endpoint is an :class:`AuthError` carrying the OAuth ``error`` code.
    """

    def post(url: str, form: Mapping[str, str], basic: tuple[str, str] | None) -> Mapping[str, Any]:
        try:
            resp = client.request("POST", url, data=dict(form), basic=basic, send_auth=False, retry=True,
                                  headers={"Accept": "application/json"})
            return parse_json_object(resp)
        except AuthError:
            raise
        except ConnectorError as exc:
            if exc.status in (400, 401, 403):
                raise AuthError(f"token request refused: {exc.message}", item=mask_url(url), status=exc.status)
            raise

    return post


def smart_configuration(client: HttpClient) -> tuple[dict[str, Any] | None, ConnectorError | None]:
    """``.well-known/smart-configuration`` (under the base, then the server root) with a
    ``token_endpoint``; (None, the last error) when neither place has one."""
    from urllib.parse import urlsplit, urlunsplit

    root = urlunsplit(urlsplit(client.base_url)._replace(path="", query="", fragment=""))
    candidates = [f"{client.base_url}/.well-known/smart-configuration", f"{root}/.well-known/smart-configuration"]
    last: ConnectorError | None = None
    for url in dict.fromkeys(candidates):
        try:
            data, _ = client.get_json(url, headers={"Accept": "application/json"}, send_auth=False)
        except ConnectorError as exc:
            last = exc
            continue
        endpoint = data.get("token_endpoint")
        if isinstance(endpoint, str) and endpoint:
            return data, None
    return None, last


def discover_token_url(client: HttpClient) -> str:
    """Find the token endpoint in ``.well-known/smart-configuration`` (under the base, then root)."""
    data, last = smart_configuration(client)
    if data is None:
        raise ConfigError("no token endpoint: .well-known/smart-configuration has none; give --token-url"
                          + (f" ({last.message})" if last else ""))
    return str(data["token_endpoint"])


def build_auth(config: Any, client: HttpClient) -> Any:
    """The auth strategy for a FHIR endpoint config (see ``FhirConfig``); reads secrets now."""
    mode = config.auth
    if mode == "none":
        return NoAuth()
    if mode == "bearer":
        return BearerAuth(read_secret(env=config.token_env, file=config.token_file, what="bearer token"))
    if mode not in ("client-credentials", "smart-backend"):
        raise ConfigError(f"unknown auth mode {mode!r} (use one of {', '.join(AUTH_MODES)})")
    if config.client_id:
        client_id = config.client_id
    else:
        client_id = read_secret(env=config.client_id_env, file=None, what="client id")
    known: dict[str, Any] | None = None
    if config.token_url:
        token_url = config.token_url
    else:
        known, last = smart_configuration(client)
        if known is None:
            raise ConfigError("no token endpoint: .well-known/smart-configuration has none; give --token-url"
                              + (f" ({last.message})" if last else ""))
        token_url = str(known["token_endpoint"])
    scopes = ScopeChoice(config.scope or SCOPE_AUTO, lambda: smart_configuration(client)[0], known)
    poster = token_poster(client)
    if mode == "client-credentials":
        secret = read_secret(env=config.client_secret_env, file=config.client_secret_file, what="client secret")
        return ClientCredentialsAuth(token_url, client_id, secret, scopes, poster)
    return SmartBackendAuth(token_url, client_id, read_private_key(config.private_key), kid=config.kid,
                            alg=config.alg, scope=scopes, poster=poster)
