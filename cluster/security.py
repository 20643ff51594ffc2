"""Security primitives for the serving gateway: who is calling, may they, and how often.

Authentication (`Authenticator`, 401 on failure). Every request carries
`Authorization: Bearer <credential>`, where the credential is either
- an API key `lf_<key_id>_<secret>`: the record is found by `key_id` and the SHA-256 of the whole key
  compared in constant time. Only the digest is stored (`ApiKeyRecord`); the key is shown once by
  `python -m cluster.security new-key` and never stored or logged; or
- a JWT signed by the company's identity provider (HS256 with a secret from an env var, or RS256/ES256
  with a public key file): signature, `exp`, `iss` and `aud` are checked, roles/tenant/attributes are
  read from configurable claims.
Unknown key ids and wrong secrets get the same message, so callers cannot probe which keys exist.

Authorization (`AccessController`, 403 on denial): role-based with attributes, decided by casbin.
A casbin policy line `p, <role>, <route pattern>, <classification ceiling>, <tenant scope>` grants a
role a route (casbin keyMatch: `*` matches any suffix) on models up to a classification
(public < internal < confidential < restricted) within a scope: `tenant` (models of the principal's
own tenant, or shared ones with tenant "*") or `any` (every tenant, and models without an access
entry). `g, <role>, <parent role>` lines let custom roles inherit. The built-in policy:
- admin:   every route, every model of every tenant, up to restricted;
- app:     the inference routes (/v1/chat/completions, /v1/completions, /v1/classify, /v1/models) on
           its own tenant's and shared models, up to confidential;
- analyst: /v1/models and /v1/classify on its own tenant's and shared models, up to internal;
- app and analyst may also send /v1/feedback (a prediction's right label) on the models they may use.
A principal's `clearance` attribute, when present, can only lower its roles' ceiling, never raise it: a
token's claims narrow what the policy grants, the policy alone grants.
A principal with several roles is allowed if any one role allows the call.
Fail closed: a model id with no `ModelAccess` entry is reachable only by an `any`-scope role (admin),
so a new adapter is invisible to apps until someone assigns it a tenant and classification. Tenant A
can reach tenant B's model only through an `any`-scope role. Parameter limits by role (`max_tokens`,
`n`) are part of the decision; a principal gets the most generous limits among its roles, and a request
that names no `max_tokens` gets its role's cap (the gateway fills it in before deciding).

Rate limits (`cluster.rate_limits`, 429 with Retry-After): requests and tokens per minute per key
as token buckets, keyed by API key id (or JWT subject). A principal gets the most generous limit
among its roles; a role without an entry is unlimited. `rate_limit_store` keeps the buckets in each
gateway replica (memory) or in Redis, one budget per key for all replicas.

Failed authentication (`FailedAuthLimiter`, 429 with Retry-After): per client address, the first
`failed_auth.max_failures` failures in a window of `failed_auth.window_seconds` (the window starts at
the address's first failure) are answered 401 and audited one by one; later failures in the window
are answered 429 without an audit entry each, only counted, and one summary entry per address and
window records how many were refused (written when the window has closed, on the gateway's next
request or at shutdown). So an attacker without a key causes at most `max_failures` + 1 audit writes
per address per window. Requests whose credentials are valid are never refused by this limit, even
from a blocked address (clients behind one NAT or proxy as an attacker keep working), and they do not
lower the address's failure count. At most `failed_auth.max_addresses` addresses are tracked; beyond
that the one whose window started first is dropped (its summary written first). The client address is
the connection's peer; `X-Forwarded-For` is believed only from `trusted_proxies`.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import casbin
import jwt
import yaml
from pydantic import Field, field_validator, model_validator

from cluster.audit import AuditSettings
from cluster.config import ConfigError, StrictModel
from cluster.rate_limits import RateLimit, RateLimitStoreSettings

Classification = Literal["public", "internal", "confidential", "restricted"]
CLASSIFICATIONS: tuple[str, ...] = ("public", "internal", "confidential", "restricted")
SCOPES = ("tenant", "any")
KEY_PREFIX = "lf_"
ADDRESS_CHARS = 64  # a client address as recorded and counted (an IPv6 address with a zone fits)
KEY_ID_PATTERN = r"^[A-Za-z0-9-]{1,64}$"  # no "_": it separates the id from the secret in a key

INFERENCE_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/models")
DEFAULT_POLICY: tuple[str, ...] = (
    "p, admin, /*, restricted, any",
    *(f"p, app, {route}, confidential, tenant" for route in INFERENCE_ROUTES),
    "p, analyst, /v1/models, internal, tenant",
    "p, analyst, /v1/classify, internal, tenant",
    # Feedback (the right label of a prediction) comes from the application that asked for the
    # prediction, or from analysts reviewing predictions; on the models they may classify with.
    "p, app, /v1/feedback, confidential, tenant",
    "p, analyst, /v1/feedback, internal, tenant",
)

# Request: one of the principal's roles, the route, how the model relates to the principal's tenant
# (own / shared / other / unknown / none), the model's classification, and the clearance attribute.
CASBIN_MODEL = """
[request_definition]
r = role, route, relation, level, clearance

[policy_definition]
p = role, route, ceiling, scope

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = g(r.role, p.role) && keyMatch(r.route, p.route) && reaches(p.scope, r.relation) && within(r.level, r.clearance, p.ceiling)
"""


class Principal(StrictModel):
    """An authenticated caller."""

    subject: str = Field(description="Who is calling: the API key's subject or the JWT's `sub`.")
    roles: list[str] = Field(default_factory=list, description="Roles granting routes and models (admin, app, analyst, ...).")
    tenant: str = Field(description="Tenant the caller belongs to; it reaches only its own tenant's and shared models.")
    attributes: dict[str, str] = Field(default_factory=dict,
                                       description="Extra attributes, e.g. {'clearance': 'internal'} (lowers the roles' ceiling, never raises it).")
    key_id: str | None = Field(default=None, description="The API key's id (the JWT subject for tokens), for rate limits and audit.")


class ApiKeyRecord(StrictModel):
    """An API key as stored: its digest, never the key."""

    key_id: str = Field(pattern=KEY_ID_PATTERN, description="Public id of the key (the middle part of `lf_<key_id>_<secret>`).")
    # Keys hold 32 random bytes, so brute force is hopeless whatever the hash speed: a fast SHA-256
    # is right here, unlike passwords, which need a slow salted hash (bcrypt, argon2).
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the whole key string.")
    subject: str = Field(min_length=1, description="Who the key belongs to (a downstream system, e.g. 'crm').")
    roles: list[str] = Field(min_length=1, description="Roles the key grants.")
    tenant: str = Field(min_length=1, description="Tenant the key belongs to.")
    attributes: dict[str, str] = Field(default_factory=dict, description="Extra attributes, e.g. {'clearance': 'internal'}.")


class JwtSettings(StrictModel):
    """How bearer JWTs from the identity provider are verified."""

    algorithm: Literal["HS256", "RS256", "ES256"] = Field(default="HS256", description="The only signing algorithm accepted.")
    secret_env: str | None = Field(default=None, description="HS256: name of the env var holding the shared secret (never the secret itself).")
    public_key_file: str | None = Field(default=None, description="RS256/ES256: PEM file with the identity provider's public key.")
    issuer: str = Field(min_length=1, description="Required `iss` claim.")
    audience: str = Field(min_length=1, description="Required `aud` claim (this gateway's identifier).")
    roles_claim: str = Field(default="roles", description="Claim holding the roles (a list, or a space-separated string).")
    tenant_claim: str = Field(default="tenant", description="Claim holding the tenant.")
    attributes_claim: str = Field(default="attributes", description="Claim holding a mapping of extra attributes (optional in tokens).")
    leeway_s: float = Field(default=30.0, ge=0, le=300, description="Clock skew tolerated on `exp`/`nbf`/`iat`, in seconds.")

    @model_validator(mode="after")
    def _one_key_source(self) -> "JwtSettings":
        if self.algorithm == "HS256" and (not self.secret_env or self.public_key_file):
            raise ValueError("jwt: HS256 needs secret_env (the env var holding the secret) and no public_key_file")
        if self.algorithm != "HS256" and (not self.public_key_file or self.secret_env):
            raise ValueError(f"jwt: {self.algorithm} needs public_key_file (a PEM public key) and no secret_env")
        return self


class ModelAccess(StrictModel):
    """Who may reach one served model or adapter."""

    tenant: str = Field(min_length=1, description="Owning tenant, or '*' for a model shared by all tenants.")
    classification: Classification = Field(default="internal", description="Data classification: public, internal, confidential or restricted.")


class ParamLimits(StrictModel):
    """Caps on request parameters for a role; None means no cap beyond the endpoint's own checks."""

    max_tokens: int | None = Field(default=None, ge=1, description="Largest `max_tokens` (or `max_completion_tokens`) allowed; "
                                                                   "also the default of a request that names none.")
    n: int | None = Field(default=None, ge=1, description="Largest `n` (completions per request) allowed.")


class FailedAuthSettings(StrictModel):
    """How many failed authentications one client address gets before it is refused (429) unaudited."""

    max_failures: int = Field(default=10, ge=1, le=10_000,
                              description="Failed authentications per client address and window that are answered 401 and audited "
                                          "one by one; later ones in the window get 429 with Retry-After, counted in one "
                                          "summary audit entry per address and window. Valid credentials are never refused.")
    window_seconds: float = Field(default=300.0, gt=0, le=86_400,
                                  description="Length of an address's window, from its first failure; the count starts again after it.")
    max_addresses: int = Field(default=10_000, ge=1, le=10_000_000,
                               description="Client addresses tracked at once (bounded memory): beyond it the address whose window "
                                           "started first is forgotten, its summary entry written first.")


def _most_generous(limits: list, model: type):
    """Per field, the largest value among `limits`; None (unlimited) wins; no limits at all = unlimited."""
    if not limits:
        return model()
    merged = {}
    for name in model.model_fields:
        values = [getattr(limit, name) for limit in limits]
        merged[name] = None if None in values else max(values)
    return model(**merged)


def parse_policy_line(line: str) -> list[str]:
    """Split and check one casbin policy line (`p, role, route, ceiling, scope` or `g, role, parent`)."""
    parts = [part.strip() for part in line.split(",")]
    if parts[0] == "p" and len(parts) == 5 and all(parts):
        if parts[3] not in CLASSIFICATIONS:
            raise ValueError(f"policy '{line}': ceiling must be one of {CLASSIFICATIONS}")
        if parts[4] not in SCOPES:
            raise ValueError(f"policy '{line}': scope must be one of {SCOPES}")
        return parts
    if parts[0] == "g" and len(parts) == 3 and all(parts):
        return parts
    raise ValueError(f"policy '{line}': expected 'p, role, route, ceiling, scope' or 'g, role, parent_role'")


class SecuritySettings(StrictModel):
    """Authentication, authorization, limits and audit for the serving gateway."""

    open_routes: list[str] = Field(default_factory=lambda: ["/-/healthz"],
                                   description="Routes served without credentials; every other route is authenticated.")
    api_keys: list[ApiKeyRecord] = Field(default_factory=list, description="API key records (digests only) accepted by the gateway.")
    api_keys_file: str | None = Field(default=None, description="YAML/JSON file with a list of API key records, "
                                                                "so keys are kept out of the serve config.")
    jwt: JwtSettings | None = Field(default=None, description="Accept JWT bearer tokens verified with these settings; None = API keys only.")
    models: dict[str, ModelAccess] = Field(default_factory=dict, description="Tenant and classification of each served model or adapter, "
                                                                             "by model id; models missing here are admin-only (fail closed).")
    policy: list[str] = Field(default_factory=list, description="Extra casbin policy lines added to the built-in ones: "
                                                                "'p, role, route, ceiling, scope' or 'g, role, parent_role'.")
    rate_limits: dict[str, RateLimit] = Field(default_factory=dict, description="Rate limit by role; a principal gets the most "
                                                                               "generous of its roles'; roles missing here are unlimited.")
    rate_limit_store: RateLimitStoreSettings = Field(
        default_factory=RateLimitStoreSettings,
        description="Where the rate limits' buckets live: per replica (memory) or in Redis, shared by every replica.")
    param_limits: dict[str, ParamLimits] = Field(default_factory=dict, description="Request parameter caps by role; a principal gets "
                                                                                  "the most generous of its roles'.")
    audit: AuditSettings = Field(default_factory=AuditSettings, description="Where the hash-chained audit log goes.")
    failed_auth: FailedAuthSettings = Field(default_factory=FailedAuthSettings,
                                            description="Per client address limit on failed authentications (429 after it).")
    trusted_proxies: list[str] = Field(default_factory=list,
                                       description="Addresses or CIDR networks of reverse proxies whose X-Forwarded-For header is "
                                                   "believed (the client is its right-most address not in this list); empty: the "
                                                   "connection's peer is the client and X-Forwarded-For is ignored.")

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"trusted proxy '{proxy}' is not an IP address or CIDR network") from None
        return proxies

    @field_validator("open_routes")
    @classmethod
    def _routes_are_paths(cls, routes: list[str]) -> list[str]:
        for route in routes:
            if not route.startswith("/"):
                raise ValueError(f"open route '{route}' must start with '/'")
        return routes

    @field_validator("policy")
    @classmethod
    def _policy_lines_parse(cls, lines: list[str]) -> list[str]:
        for line in lines:
            parse_policy_line(line)
        return lines

    def policy_rules(self) -> list[list[str]]:
        return [parse_policy_line(line) for line in (*DEFAULT_POLICY, *self.policy)]

    def known_roles(self) -> set[str]:
        roles = set()
        for rule in self.policy_rules():
            roles.update(rule[1:2] if rule[0] == "p" else rule[1:3])
        return roles

    def check_key_records(self, records: list[ApiKeyRecord], source: str) -> None:
        """Duplicate key ids or roles no policy knows -> ValueError naming them."""
        ids = [record.key_id for record in records]
        duplicates = sorted({key_id for key_id in ids if ids.count(key_id) > 1})
        if duplicates:
            raise ValueError(f"{source}: duplicate key_id(s) {duplicates}")
        for record in records:
            unknown = sorted(set(record.roles) - self.known_roles())
            if unknown:
                raise ValueError(f"{source}: key '{record.key_id}' has unknown role(s) {unknown}")

    @model_validator(mode="after")
    def _names_are_known(self) -> "SecuritySettings":
        self.check_key_records(self.api_keys, "api_keys")
        for section in ("rate_limits", "param_limits"):
            unknown = sorted(set(getattr(self, section)) - self.known_roles())
            if unknown:
                raise ValueError(f"{section}: unknown role(s) {unknown}; known roles: {sorted(self.known_roles())}")
        return self

    def load_api_keys(self) -> list[ApiKeyRecord]:
        """The inline records plus those in `api_keys_file`, checked together."""
        records = list(self.api_keys)
        if self.api_keys_file:
            path = Path(self.api_keys_file).expanduser()
            if not path.is_file():
                raise ConfigError(f"api_keys_file not found: {path}")
            loaded = yaml.safe_load(path.read_text()) or []  # YAML is a superset of JSON
            if not isinstance(loaded, list):
                raise ConfigError(f"{path}: expected a list of API key records")
            try:
                records += [ApiKeyRecord.model_validate(item) for item in loaded]
                self.check_key_records(records, f"api_keys + {path}")
            except ValueError as error:  # pydantic's ValidationError is a ValueError
                raise ConfigError(f"{path}: {error}") from None
        return records

    def rate_limit_for(self, principal: Principal) -> RateLimit:
        return _most_generous([self.rate_limits.get(role, RateLimit()) for role in principal.roles], RateLimit)

    def param_limits_for(self, principal: Principal) -> ParamLimits:
        return _most_generous([self.param_limits.get(role, ParamLimits()) for role in principal.roles], ParamLimits)


class AuthError(Exception):
    """No usable credentials (HTTP 401); the message is safe to return to the client."""


class AccessDenied(Exception):
    """Authenticated but not allowed (HTTP 403); the message is safe to return to the client."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key(subject: str, roles: list[str], tenant: str, attributes: dict[str, str] | None = None,
                key_id: str | None = None) -> tuple[str, ApiKeyRecord]:
    """A fresh key `lf_<key_id>_<secret>` (32 random bytes) and the record to store for it."""
    key_id = key_id or secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKeyRecord(key_id=key_id, sha256=hash_key(key), subject=subject, roles=roles, tenant=tenant,
                          attributes=attributes or {})
    return key, record


# The demo's (or a user's) admin key, in the submitting shell only: never in a job's runtime env.
LOCAL_KEY_ENV = "LAKEFORGE_API_KEY"
# What a submitted job is given instead: the key's record (its digest), as JSON.
KEY_RECORD_ENV = "LAKEFORGE_API_KEY_RECORD"


def record_for_key(key: str, subject: str, roles: list[str], tenant: str, source: str = LOCAL_KEY_ENV) -> ApiKeyRecord:
    """The record (digest) of an existing key `lf_<key_id>_<secret>`; `source` names where the key came from."""
    if not key.startswith(KEY_PREFIX) or "_" not in key[len(KEY_PREFIX):]:
        raise ConfigError(f"{source} must look like lf_<key_id>_<secret> (make one: python -m cluster.security new-key)")
    key_id = key[len(KEY_PREFIX):].split("_", 1)[0]
    try:
        return ApiKeyRecord(key_id=key_id, sha256=hash_key(key), subject=subject, roles=roles, tenant=tenant)
    except ValueError as error:
        raise ConfigError(f"{source}: the key's id {key_id!r} is not a valid key id ({error})") from None


def key_record_from_env(environ: dict[str, str] | None = None) -> ApiKeyRecord | None:
    """The ApiKeyRecord in $LAKEFORGE_API_KEY_RECORD (JSON: key_id, sha256, subject, roles, tenant and
    optional attributes; unknown fields rejected), or None when it is unset or empty. A malformed
    record is a ConfigError naming the variable. A record holds a digest, never a key."""
    raw = (os.environ if environ is None else environ).get(KEY_RECORD_ENV)
    if not raw:
        return None
    try:
        return ApiKeyRecord.model_validate_json(raw)
    except ValueError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in item['loc']) or 'record'}: {item['msg']}"
                             for item in getattr(error, "errors", lambda: [])()) or str(error)
        raise ConfigError(f"{KEY_RECORD_ENV} is not a valid API key record (JSON with key_id, sha256, subject, "
                          f"roles, tenant; make one with: python -m cluster.security key-record): {problems}") from None


class Authenticator:
    """Turns an `Authorization` header into a `Principal`, or raises `AuthError`."""

    def __init__(self, settings: SecuritySettings):
        self._keys = {record.key_id: record for record in settings.load_api_keys()}
        self._jwt = settings.jwt
        self._jwt_key = self._load_jwt_key(settings.jwt) if settings.jwt else None

    @staticmethod
    def _load_jwt_key(cfg: JwtSettings):
        if cfg.algorithm == "HS256":
            secret = os.environ.get(cfg.secret_env)
            if secret is None:
                raise ConfigError(f"jwt: env var {cfg.secret_env} (the HS256 secret) is not set")
            if len(secret.encode()) < 32:  # RFC 7518 3.2: an HS256 key at least as long as the hash
                raise ConfigError(f"jwt: env var {cfg.secret_env} must hold a secret of at least 32 bytes")
            return secret
        path = Path(cfg.public_key_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"jwt: public_key_file not found: {path}")
        try:
            return jwt.get_algorithm_by_name(cfg.algorithm).prepare_key(path.read_bytes())
        except (ValueError, TypeError, jwt.InvalidKeyError) as error:
            raise ConfigError(f"jwt: {path} is not a usable {cfg.algorithm} public key: {error}") from None

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.strip():
            raise AuthError("missing credentials: send 'Authorization: Bearer <api key or token>'")
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthError("malformed Authorization header: expected 'Bearer <api key or token>'")
        if credential.startswith(KEY_PREFIX):
            return self._from_key(credential)
        if credential.count(".") == 2:
            return self._from_jwt(credential)
        raise AuthError("credential is neither a lakeforge API key nor a JWT")

    def _from_key(self, key: str) -> Principal:
        key_id = key[len(KEY_PREFIX):].split("_", 1)[0]
        record = self._keys.get(key_id)
        # Compare even for unknown ids, so timing does not tell which key ids exist.
        if not hmac.compare_digest(hash_key(key), record.sha256 if record else "0" * 64) or record is None:
            raise AuthError("invalid API key")
        return Principal(subject=record.subject, roles=record.roles, tenant=record.tenant,
                         attributes=record.attributes, key_id=record.key_id)

    def _from_jwt(self, token: str) -> Principal:
        cfg = self._jwt
        if cfg is None:
            raise AuthError("JWT bearer tokens are not accepted by this endpoint; use an API key")
        try:
            claims = jwt.decode(token, self._jwt_key, algorithms=[cfg.algorithm], audience=cfg.audience,
                                issuer=cfg.issuer, leeway=cfg.leeway_s,
                                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience is not accepted here") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer is not trusted") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid") from None
        except jwt.InvalidTokenError as error:  # PyJWT's messages name claims, never key material
            raise AuthError(f"invalid token: {error}") from None
        roles = claims.get(cfg.roles_claim, [])
        roles = roles.split() if isinstance(roles, str) else roles
        tenant = claims.get(cfg.tenant_claim)
        attributes = claims.get(cfg.attributes_claim, {})
        if not isinstance(tenant, str) or not tenant:
            raise AuthError(f"token has no '{cfg.tenant_claim}' claim")
        if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
            raise AuthError(f"token claim '{cfg.roles_claim}' must be a list of role names")
        if not isinstance(attributes, dict):
            raise AuthError(f"token claim '{cfg.attributes_claim}' must be a mapping")
        return Principal(subject=str(claims["sub"]), roles=roles, tenant=tenant,
                         attributes={str(k): str(v) for k, v in attributes.items()}, key_id=str(claims["sub"]))


@dataclass(frozen=True)
class Decision:
    """An access decision; audit `detail or reason`, return only `reason` to the client."""

    allowed: bool
    reason: str  # safe to return to the client
    detail: str = ""  # the precise cause, for the audit log only (may name other tenants' models)


def _reaches(scope: str, relation: str) -> bool:
    return scope == "any" or relation in ("own", "shared", "none")


def _within(level: str, clearance: str, ceiling: str) -> bool:
    """`level` is at most the role's `ceiling` and, when a clearance is given, at most the clearance:
    a clearance narrows the ceiling, never widens it (a JWT's claims cannot grant what the policy does not)."""
    limits = [ceiling, clearance] if clearance else [ceiling]
    if level not in CLASSIFICATIONS or any(limit not in CLASSIFICATIONS for limit in limits):
        return False  # an unrecognised clearance or level grants nothing
    return all(CLASSIFICATIONS.index(level) <= CLASSIFICATIONS.index(limit) for limit in limits)


class AccessController:
    """Decides whether a principal may call a route on a model with given parameters (see module doc)."""

    def __init__(self, settings: SecuritySettings):
        self._settings = settings
        model = casbin.Enforcer.new_model(text=CASBIN_MODEL)
        self._enforcer = casbin.Enforcer(model)
        self._enforcer.add_function("reaches", _reaches)
        self._enforcer.add_function("within", _within)
        rules = settings.policy_rules()
        self._enforcer.add_policies([rule[1:] for rule in rules if rule[0] == "p"])
        groupings = [rule[1:] for rule in rules if rule[0] == "g"]
        if groupings:
            self._enforcer.add_grouping_policies(groupings)

    def _allows(self, principal: Principal, route: str, relation: str, level: str, clearance: str) -> bool:
        return any(self._enforcer.enforce(role, route, relation, level, clearance) for role in principal.roles)

    def _relation(self, principal: Principal, model_id: str | None) -> tuple[str, str]:
        """How the model relates to the principal's tenant, and its classification."""
        if model_id is None:
            return "none", "public"
        access = self._settings.models.get(model_id)
        if access is None:
            return "unknown", "restricted"  # fail closed: only any-scope roles reach unregistered models
        if access.tenant == "*":
            return "shared", access.classification
        return ("own" if access.tenant == principal.tenant else "other"), access.classification

    def decide(self, principal: Principal, route: str, model_id: str | None, params: dict) -> Decision:
        relation, level = self._relation(principal, model_id)
        clearance = principal.attributes.get("clearance", "")
        roles = ", ".join(principal.roles) or "(none)"
        if not self._allows(principal, route, relation, level, clearance):
            # Re-ask casbin with the model's constraints relaxed one at a time to name the cause.
            if not self._allows(principal, route, "none", "public", ""):
                return Decision(False, f"role(s) {roles} may not call {route}")
            if not self._allows(principal, route, relation, "public", ""):
                cause = ("has no access entry (unregistered models are admin-only)" if relation == "unknown"
                         else f"belongs to tenant '{self._settings.models[model_id].tenant}'")
                # Same message for both causes, so a caller cannot probe other tenants' model names.
                return Decision(False, f"model '{model_id}' is not available to you",
                                f"model '{model_id}' {cause}; caller tenant '{principal.tenant}'")
            # Name the clearance only when it is what denies (the roles' ceiling would allow).
            by_clearance = clearance and self._allows(principal, route, relation, level, "")
            ceiling = f"clearance '{clearance}'" if by_clearance else f"the ceiling of role(s) {roles}"
            return Decision(False, f"model '{model_id}' is classified '{level}', above {ceiling}")
        limits = self._settings.param_limits_for(principal)
        requested = {"max_tokens": params.get("max_tokens", params.get("max_completion_tokens")), "n": params.get("n")}
        for name, value in requested.items():
            cap = getattr(limits, name)
            if cap is not None and isinstance(value, int) and value > cap:
                return Decision(False, f"{name}={value} exceeds the limit {cap} for role(s) {roles}")
        return Decision(True, f"allowed for role(s) {roles}")

    def check(self, principal: Principal, route: str, model_id: str | None, params: dict) -> Decision:
        """`decide`, raising `AccessDenied` with the client-safe reason when denied."""
        decision = self.decide(principal, route, model_id, params)
        if not decision.allowed:
            raise AccessDenied(decision.reason)
        return decision

    def visible_models(self, principal: Principal, model_ids: Iterable[str], route: str = "/v1/models") -> list[str]:
        """The served model ids this principal may see (for `/v1/models`)."""
        return [model_id for model_id in model_ids if self.decide(principal, route, model_id, {}).allowed]


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies: Iterable[str]) -> str:
    """The client's address: the connection's `peer`, or, when the peer is a trusted proxy, the
    right-most `X-Forwarded-For` address that is not a trusted proxy (a client can put anything to
    the left of what its proxy appends, so nothing further left is believed)."""
    networks = [ipaddress.ip_network(proxy, strict=False) for proxy in trusted_proxies]

    def trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in networks)

    client = peer or "unknown"
    if networks and trusted(client) and forwarded_for:
        for hop in reversed([part.strip() for part in forwarded_for.split(",") if part.strip()]):
            client = hop
            if not trusted(hop):
                break
    return client[:ADDRESS_CHARS]  # a header holds whatever a proxy put there: the limiter's keys stay small


@dataclass
class _Failures:
    started: float  # when the window began (the first failure)
    failures: int = 0  # failures answered 401 in the window
    refused: int = 0  # failures answered 429 in the window, not yet audited


class FailedAuthLimiter:
    """Failed authentications per client address in fixed windows (see the module doc); thread-safe.

    `fail(address)` counts one failed authentication: (None, ...) while the address is within its
    `max_failures` (answer 401 and audit it), else (seconds until its window ends, ...) (answer 429;
    only counted). Every method also returns the summaries of windows that have closed or been
    evicted, `{"event": "failed_auth_limited", "client", "failures", "refused", "window_seconds"}`,
    for the audit log, one per address and window that refused anything; `expired()` returns just
    those, `drain()` those of every window (at shutdown).
    """

    def __init__(self, settings: FailedAuthSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        # By window start, oldest first: windows are equally long, so they also close in this order.
        self._windows: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def _summary(self, address: str, window: _Failures) -> dict:
        return {"event": "failed_auth_limited", "client": address, "failures": window.failures,
                "refused": window.refused, "window_seconds": self.settings.window_seconds}

    def _expire(self, now: float) -> list[dict]:
        """Drop closed windows and those beyond `max_addresses` (oldest first); their summaries."""
        summaries = []
        while self._windows:
            address, window = next(iter(self._windows.items()))
            if now - window.started < self.settings.window_seconds and len(self._windows) <= self.settings.max_addresses:
                break
            del self._windows[address]
            if window.refused:
                summaries.append(self._summary(address, window))
        return summaries

    def fail(self, address: str) -> tuple[float | None, list[dict]]:
        """Count a failed authentication from `address`: (None or seconds to wait, closed summaries)."""
        with self._lock:
            now = self.clock()
            summaries = self._expire(now)
            window = self._windows.get(address)
            if window is None:
                window = self._windows[address] = _Failures(started=now)
                summaries += self._expire(now)  # one more address may push the oldest out
            if window.failures < self.settings.max_failures:
                window.failures += 1
                return None, summaries
            window.refused += 1
            return max(window.started + self.settings.window_seconds - now, 0.001), summaries

    def expired(self) -> list[dict]:
        """The summaries of windows that have closed since the last call."""
        with self._lock:
            return self._expire(self.clock())

    def drain(self) -> list[dict]:
        """Forget every window; the summaries of those that refused requests."""
        with self._lock:
            summaries = [self._summary(address, window) for address, window in self._windows.items() if window.refused]
            self._windows.clear()
            return summaries


def add_commands(parser: argparse.ArgumentParser) -> None:
    """The key commands, under `python -m cluster.security` and `lakeforge keys`; each sets `handler`."""
    commands = parser.add_subparsers(dest="key_command", required=True, metavar="{new,record}")
    new = commands.add_parser("new", aliases=["new-key"],
                              help="make an API key: prints the key once and the record to store")
    new.add_argument("--subject", required=True, help="who the key is for, e.g. crm")
    new.add_argument("--role", action="append", required=True, help="role to grant (repeat for several)")
    new.add_argument("--tenant", required=True, help="tenant the key belongs to; it reaches that tenant's and shared models")
    new.add_argument("--attr", action="append", default=[], metavar="NAME=VALUE", help="attribute, e.g. clearance=internal")
    new.add_argument("--key-id", default=None, help="public key id (letters, digits, '-'); random if not given")
    new.set_defaults(handler=partial(_new_key, new))
    record = commands.add_parser(
        "record", aliases=["key-record"],
        help=f"print the record (digest) of the key in ${LOCAL_KEY_ENV}, as JSON for ${KEY_RECORD_ENV}")
    record.add_argument("--subject", default="lakeforge-user", help="who the key belongs to")
    record.add_argument("--role", action="append", default=None, help="role to grant (repeat; default admin)")
    record.add_argument("--tenant", default="lakeforge")
    record.set_defaults(handler=partial(_key_record, record))


def _key_record(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    key = os.environ.get(LOCAL_KEY_ENV)
    if not key:
        parser.error(f"set {LOCAL_KEY_ENV} to the key (the key is read from the environment, never from argv)")
    try:
        print(record_for_key(key, args.subject, args.role or ["admin"], args.tenant).model_dump_json())
    except ConfigError as error:
        parser.error(str(error))
    return 0


def _new_key(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    bad = [attr for attr in args.attr if "=" not in attr]
    if bad:
        parser.error(f"--attr expects NAME=VALUE, got {bad}")
    if args.key_id is not None and not re.match(KEY_ID_PATTERN, args.key_id):
        parser.error("--key-id may hold only letters, digits and '-'")
    key, record = new_api_key(args.subject, args.role, args.tenant, dict(attr.split("=", 1) for attr in args.attr), args.key_id)
    print("# API key (shown only now; give it to the client through a secret store):")
    print(key)
    print("# Record for the api_keys file (holds only the key's SHA-256):")
    print(yaml.safe_dump([json.loads(record.model_dump_json())], sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.security", description="lakeforge security tools")
    add_commands(parser)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
