import secrets
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from cluster.config import ConfigError
from cluster.security import (
    AccessController, AccessDenied, ApiKeyRecord, AuthError, Authenticator, FailedAuthLimiter, FailedAuthSettings,
    JwtSettings, ModelAccess, ParamLimits, Principal, RateLimit, SecuritySettings, client_address,
    new_api_key,
)

REPO = Path(__file__).resolve().parents[1]
ISSUER, AUDIENCE = "https://idp.example", "lakeforge-gateway"


def token(key, algorithm="HS256", **overrides):
    claims = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300,
              "roles": ["analyst"], "tenant": "acme", "attributes": {"clearance": "internal"}}
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=algorithm)


# ---------------------------------------------------------------- API keys

def test_api_key_record_holds_only_the_digest():
    key, record = new_api_key("crm", ["app"], "acme", {"clearance": "internal"})
    assert key.startswith(f"lf_{record.key_id}_") and len(key) > 40
    secret = key.split("_", 2)[2]
    dumped = record.model_dump_json()
    assert key not in dumped and secret not in dumped
    assert record.sha256 != secret and len(record.sha256) == 64


def test_good_unknown_and_wrong_secret_keys():
    key, record = new_api_key("crm", ["app"], "acme", {"clearance": "internal"})
    auth = Authenticator(SecuritySettings(api_keys=[record]))
    principal = auth.authenticate(f"Bearer {key}")
    assert principal == Principal(subject="crm", roles=["app"], tenant="acme",
                                  attributes={"clearance": "internal"}, key_id=record.key_id)
    wrong_secret = f"lf_{record.key_id}_{secrets.token_urlsafe(32)}"
    unknown_id = key.replace(record.key_id, "nosuchkey", 1)
    messages = set()
    for bad in (wrong_secret, unknown_id, key[:-1]):
        with pytest.raises(AuthError) as error:
            auth.authenticate(f"Bearer {bad}")
        messages.add(str(error.value))
    assert messages == {"invalid API key"}  # same answer, so key ids cannot be probed
    for header in (None, "", f"Basic {key}", "Bearer ", "Bearer not-a-credential"):
        with pytest.raises(AuthError):
            auth.authenticate(header)


def test_keys_file_is_loaded_and_checked(tmp_path):
    key, record = new_api_key("ticketing", ["analyst"], "beta")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([record.model_dump()]))
    assert Authenticator(SecuritySettings(api_keys_file=str(keys_file))).authenticate(f"Bearer {key}").tenant == "beta"
    with pytest.raises(ConfigError, match="duplicate key_id"):
        Authenticator(SecuritySettings(api_keys=[record], api_keys_file=str(keys_file)))
    keys_file.write_text(yaml.safe_dump([{**record.model_dump(), "roles": ["superuser"]}]))
    with pytest.raises(ConfigError, match="unknown role"):
        Authenticator(SecuritySettings(api_keys_file=str(keys_file)))
    with pytest.raises(ConfigError, match="not found"):
        Authenticator(SecuritySettings(api_keys_file=str(tmp_path / "missing.yaml")))


def test_new_key_cli_prints_a_key_that_its_record_accepts():
    result = subprocess.run([sys.executable, "-m", "cluster.security", "new-key", "--subject", "crm", "--role", "app",
                             "--tenant", "acme", "--attr", "clearance=internal"],
                            capture_output=True, text=True, cwd=REPO, timeout=60, check=True)
    lines = result.stdout.splitlines()
    key = next(line for line in lines if line.startswith("lf_"))
    records = yaml.safe_load("\n".join(line for line in lines if not line.startswith(("lf_", "#"))))
    assert result.stdout.count(key) == 1
    settings = SecuritySettings(api_keys=[ApiKeyRecord.model_validate(item) for item in records])
    assert Authenticator(settings).authenticate(f"Bearer {key}").attributes == {"clearance": "internal"}


# ---------------------------------------------------------------- JWT

@pytest.fixture
def hs_auth(monkeypatch):
    secret = secrets.token_urlsafe(48)
    monkeypatch.setenv("LF_TEST_JWT_SECRET", secret)
    cfg = JwtSettings(secret_env="LF_TEST_JWT_SECRET", issuer=ISSUER, audience=AUDIENCE, leeway_s=0)
    return Authenticator(SecuritySettings(jwt=cfg)), secret


def test_hs256_good_expired_wrong_audience_bad_signature(hs_auth):
    auth, secret = hs_auth
    principal = auth.authenticate(f"Bearer {token(secret)}")
    assert (principal.subject, principal.roles, principal.tenant, principal.key_id) == ("alice", ["analyst"], "acme", "alice")
    assert principal.attributes == {"clearance": "internal"}
    cases = {
        "expired": token(secret, exp=int(time.time()) - 10),
        "audience": token(secret, aud="someone-else"),
        "issuer": token(secret, iss="https://evil.example"),
        "signature": token(secrets.token_urlsafe(48)),
        "exp": token(secret, exp=None),
        "tenant": token(secret, tenant=None),
    }
    for expected, bad in cases.items():
        with pytest.raises(AuthError, match=expected):
            auth.authenticate(f"Bearer {bad}")
    # alg confusion: a token with another algorithm is refused even if otherwise valid
    with pytest.raises(AuthError):
        auth.authenticate(f"Bearer {token(secret, algorithm='HS512')}")


def test_rs256_with_a_public_key_file(tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "idp.pem").write_bytes(pem)
    cfg = JwtSettings(algorithm="RS256", public_key_file=str(tmp_path / "idp.pem"), issuer=ISSUER, audience=AUDIENCE,
                      roles_claim="groups", tenant_claim="org")
    auth = Authenticator(SecuritySettings(jwt=cfg))
    principal = auth.authenticate(f"Bearer {token(private, 'RS256', roles=None, tenant=None, groups='app analyst', org='beta')}")
    assert principal.roles == ["app", "analyst"] and principal.tenant == "beta"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(AuthError, match="signature"):
        auth.authenticate(f"Bearer {token(other, 'RS256', org='beta')}")
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate(f"Bearer {token(private, 'RS256', org='beta', exp=int(time.time()) - 3600)}")
    with pytest.raises(AuthError, match="audience"):
        auth.authenticate(f"Bearer {token(private, 'RS256', org='beta', aud='x')}")


def test_jwt_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="HS256 needs secret_env"):
        JwtSettings(issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(ValidationError, match="RS256 needs public_key_file"):
        JwtSettings(algorithm="RS256", secret_env="X", issuer=ISSUER, audience=AUDIENCE)
    monkeypatch.delenv("LF_UNSET", raising=False)
    with pytest.raises(ConfigError, match="LF_UNSET .* is not set"):
        Authenticator(SecuritySettings(jwt=JwtSettings(secret_env="LF_UNSET", issuer=ISSUER, audience=AUDIENCE)))
    monkeypatch.setenv("LF_SHORT", "tooshort")
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Authenticator(SecuritySettings(jwt=JwtSettings(secret_env="LF_SHORT", issuer=ISSUER, audience=AUDIENCE)))
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="not a usable RS256 public key"):
        Authenticator(SecuritySettings(jwt=JwtSettings(algorithm="RS256", public_key_file=str(tmp_path / "bad.pem"),
                                                       issuer=ISSUER, audience=AUDIENCE)))
    no_jwt = Authenticator(SecuritySettings())
    with pytest.raises(AuthError, match="not accepted"):
        no_jwt.authenticate(f"Bearer {token(secrets.token_urlsafe(48))}")


# ---------------------------------------------------------------- settings validation

@pytest.mark.parametrize("tree, named", [
    ({"rate_limits": {"ap": {"requests_per_minute": 5}}}, "rate_limits: unknown role(s) ['ap']"),
    ({"param_limits": {"guest": {"max_tokens": 5}}}, "param_limits: unknown role(s) ['guest']"),
    ({"policy": ["p, app, /v1/x, secret, tenant"]}, "ceiling must be one of"),
    ({"policy": ["q, app"]}, "expected 'p, role, route, ceiling, scope'"),
    ({"models": {"m": {"tenant": "a", "classification": "top-secret"}}}, "models.m.classification"),
    ({"open_routes": ["healthz"]}, "must start with '/'"),
    ({"jwt": {"algorithm": "ES256", "issuer": "i", "audience": "a"}}, "ES256 needs public_key_file"),
])
def test_bad_settings_are_named(tree, named):
    with pytest.raises(ValidationError) as error:
        SecuritySettings.model_validate(tree)
    assert named in str(error.value)


def test_duplicate_key_ids_and_custom_roles():
    _, record = new_api_key("crm", ["app"], "acme", key_id="crm-1")
    with pytest.raises(ValidationError, match=r"duplicate key_id\(s\) \['crm-1'\]"):
        SecuritySettings(api_keys=[record, record])
    # a role introduced by a policy line is known, so it may carry limits
    settings = SecuritySettings(policy=["g, support, analyst"], rate_limits={"support": RateLimit(requests_per_minute=3)})
    assert "support" in settings.known_roles()


# ---------------------------------------------------------------- authorization

MODELS = {
    "acme-sentiment": ModelAccess(tenant="acme", classification="internal"),
    "acme-contracts": ModelAccess(tenant="acme", classification="confidential"),
    "acme-payroll": ModelAccess(tenant="acme", classification="restricted"),
    "beta-support": ModelAccess(tenant="beta", classification="public"),
    "base": ModelAccess(tenant="*", classification="public"),
}
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/models", "/v1/feedback", "/admin/reload"]
ALLOWED_ROUTES = {
    "admin": set(ROUTES),
    "app": {"/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/models", "/v1/feedback"},
    "analyst": {"/v1/classify", "/v1/models", "/v1/feedback"},
}


def who(role, tenant="acme", **attributes):
    return Principal(subject=f"{role}-user", roles=[role], tenant=tenant, attributes=attributes, key_id=f"{role}-key")


@pytest.fixture
def access():
    return AccessController(SecuritySettings(models=MODELS, param_limits={"app": ParamLimits(max_tokens=256, n=2)}))


@pytest.mark.parametrize("role", ["admin", "app", "analyst"])
@pytest.mark.parametrize("route", ROUTES)
def test_each_role_on_each_route(access, role, route):
    decision = access.decide(who(role), route, "acme-sentiment", {})
    assert decision.allowed == (route in ALLOWED_ROUTES[role]), decision
    if not decision.allowed:
        assert decision.reason == f"role(s) {role} may not call {route}"
        with pytest.raises(AccessDenied, match=route):
            access.check(who(role), route, "acme-sentiment", {})


def test_tenant_isolation(access):
    for role in ("app", "analyst"):
        denied = access.decide(who(role, tenant="acme"), "/v1/classify", "beta-support", {})
        # the client is told neither whose model it is nor that it exists (same as for an unknown id)
        assert not denied.allowed and denied.reason == "model 'beta-support' is not available to you"
        assert "belongs to tenant 'beta'" in denied.detail
        assert access.decide(who(role, tenant="beta"), "/v1/classify", "beta-support", {}).allowed
        assert access.decide(who(role, tenant="beta"), "/v1/classify", "base", {}).allowed  # shared
    assert access.decide(who("admin", tenant="acme"), "/v1/chat/completions", "beta-support", {}).allowed
    assert access.visible_models(who("app", tenant="beta"), MODELS) == ["beta-support", "base"]


def test_classification_ceilings_and_clearance(access):
    def allowed(principal, model):
        return access.decide(principal, "/v1/classify", model, {}).allowed
    assert [allowed(who("analyst"), m) for m in ("acme-sentiment", "acme-contracts", "acme-payroll")] == [True, False, False]
    assert [allowed(who("app"), m) for m in ("acme-sentiment", "acme-contracts", "acme-payroll")] == [True, True, False]
    assert allowed(who("admin"), "acme-payroll")
    assert not allowed(who("app", clearance="internal"), "acme-contracts")  # a clearance lowers the ceiling
    assert not allowed(who("app", clearance="bogus"), "acme-sentiment")  # unrecognised clearance grants nothing
    reason = access.decide(who("analyst"), "/v1/classify", "acme-contracts", {}).reason
    assert reason == "model 'acme-contracts' is classified 'confidential', above the ceiling of role(s) analyst"
    reason = access.decide(who("app", clearance="internal"), "/v1/classify", "acme-contracts", {}).reason
    assert reason == "model 'acme-contracts' is classified 'confidential', above clearance 'internal'"


def test_a_clearance_never_raises_the_roles_ceiling(access):
    """A token's `attributes.clearance` is the caller's own claim: it may narrow the policy, not widen it."""
    for principal, model in [(who("app", clearance="restricted"), "acme-payroll"),
                             (who("analyst", clearance="confidential"), "acme-contracts"),
                             (who("analyst", clearance="restricted"), "acme-payroll")]:
        decision = access.decide(principal, "/v1/classify", model, {})
        assert not decision.allowed and decision.reason.endswith(f"above the ceiling of role(s) {principal.roles[0]}")
    assert access.decide(who("admin", clearance="restricted"), "/v1/classify", "acme-payroll", {}).allowed


def test_unknown_model_fails_closed_except_for_admin(access):
    decision = access.decide(who("app"), "/v1/chat/completions", "acme-new-adapter", {})
    assert not decision.allowed and "no access entry" in decision.detail
    assert decision.reason == "model 'acme-new-adapter' is not available to you"
    assert access.decide(who("admin"), "/v1/chat/completions", "acme-new-adapter", {}).allowed


def test_parameter_limits_take_the_most_generous_role(access):
    app = who("app")
    assert access.decide(app, "/v1/completions", "acme-sentiment", {"max_tokens": 256, "n": 2}).allowed
    over = access.decide(app, "/v1/completions", "acme-sentiment", {"max_tokens": 257})
    assert not over.allowed and over.reason == "max_tokens=257 exceeds the limit 256 for role(s) app"
    assert not access.decide(app, "/v1/chat/completions", "acme-sentiment", {"max_completion_tokens": 1000}).allowed
    assert not access.decide(app, "/v1/chat/completions", "acme-sentiment", {"n": 3}).allowed
    # app + admin: admin has no caps, so the principal has none
    both = Principal(subject="ops", roles=["app", "admin"], tenant="acme")
    assert access.decide(both, "/v1/completions", "acme-sentiment", {"max_tokens": 4096, "n": 8}).allowed


@pytest.mark.parametrize("route, role", [
    ('/admin" || True || "', "analyst"), ("/admin') or True or ('", "analyst"), ("/admin", 'analyst" || True || "'),
])
def test_hostile_strings_are_data_not_policy_expressions(access, route, role):
    principal = Principal(subject="x", roles=[role], tenant="acme")
    assert not access.decide(principal, route, "acme-sentiment", {}).allowed


def test_custom_policy_lines_extend_the_defaults():
    settings = SecuritySettings(models=MODELS, policy=["g, support, analyst", "p, support, /v1/chat/completions, public, tenant"])
    access = AccessController(settings)
    support = who("support")
    assert access.decide(support, "/v1/classify", "acme-sentiment", {}).allowed  # inherited from analyst
    assert not access.decide(support, "/v1/chat/completions", "acme-sentiment", {}).allowed  # internal > public
    assert access.decide(support, "/v1/chat/completions", "base", {}).allowed


def test_rate_limit_is_the_most_generous_of_the_roles():
    settings = SecuritySettings(rate_limits={"app": RateLimit(requests_per_minute=10, tokens_per_minute=1000),
                                             "analyst": RateLimit(requests_per_minute=60, tokens_per_minute=None)})
    both = Principal(subject="x", roles=["app", "analyst"], tenant="acme")
    assert settings.rate_limit_for(both) == RateLimit(requests_per_minute=60, tokens_per_minute=None)
    assert settings.rate_limit_for(who("app")) == RateLimit(requests_per_minute=10, tokens_per_minute=1000)
    assert settings.rate_limit_for(who("admin")) == RateLimit()


# ---------------------------------------------------------------- failed authentication

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_failed_auth_refuses_past_its_failures_until_the_window_closes_then_summarises():
    clock = FakeClock()
    limiter = FailedAuthLimiter(FailedAuthSettings(max_failures=2, window_seconds=60), clock)
    assert [limiter.fail("a")[0] for _ in range(2)] == [None, None]
    clock.now += 20
    assert [limiter.fail("a")[0] for _ in range(3)] == [pytest.approx(40.0)] * 3
    assert limiter.fail("b") == (None, [])  # addresses are independent
    assert limiter.expired() == []
    clock.now += 40
    assert limiter.expired() == [{"event": "failed_auth_limited", "client": "a", "failures": 2, "refused": 3,
                                  "window_seconds": 60.0}]
    assert limiter.fail("a") == (None, [])  # a fresh window
    assert len(limiter) == 2
    clock.now += 20
    assert limiter.expired() == [] and len(limiter) == 1  # b's window closed, but it refused nothing: no summary


def test_failed_auth_tracks_a_bounded_number_of_addresses():
    clock = FakeClock()
    limiter = FailedAuthLimiter(FailedAuthSettings(max_failures=1, window_seconds=60, max_addresses=100), clock)
    assert limiter.fail("first")[0] is None and limiter.fail("first")[0] is not None
    summaries = []
    for n in range(5000):
        clock.now += 0.001
        wait, closed = limiter.fail(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
        assert wait is None
        summaries += closed
        assert len(limiter) <= 100
    # The oldest address was dropped first, and its refusal was not lost with it.
    assert summaries == [{"event": "failed_auth_limited", "client": "first", "failures": 1, "refused": 1,
                          "window_seconds": 60.0}]
    assert limiter.drain() == [] and len(limiter) == 0


def test_client_address_believes_forwarded_for_only_from_trusted_proxies():
    assert client_address("198.51.100.9", "192.0.2.1", []) == "198.51.100.9"
    assert client_address("198.51.100.9", "192.0.2.1", ["10.0.0.0/8"]) == "198.51.100.9"  # not a proxy
    assert client_address("10.0.0.5", "192.0.2.1", ["10.0.0.0/8"]) == "192.0.2.1"
    # What a client writes itself sits left of what the proxies append: the right-most untrusted wins.
    assert client_address("10.0.0.5", "6.6.6.6, 192.0.2.1, 10.0.0.4", ["10.0.0.0/8"]) == "192.0.2.1"
    assert client_address("10.0.0.5", None, ["10.0.0.0/8"]) == "10.0.0.5"
    assert client_address(None, None, []) == "unknown"
    assert len(client_address("10.0.0.5", "x" * 10_000, ["10.0.0.0/8"])) == 64  # bounded, whatever a proxy sends
    with pytest.raises(ValidationError, match="not an IP address"):
        SecuritySettings(trusted_proxies=["proxy.internal"])


def test_every_security_field_is_described():
    from cluster.audit import AuditSettings
    from tests.conftest import config_models, undescribed_fields

    # The settings' list[...], X | None and dict[str, ...] fields hold the other models; Principal is no field.
    assert {ApiKeyRecord, JwtSettings, ModelAccess, RateLimit, ParamLimits, AuditSettings,
            FailedAuthSettings} <= set(config_models(SecuritySettings))
    assert undescribed_fields(SecuritySettings, Principal) == []
