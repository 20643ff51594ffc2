"""Secrets stay where they are used (issue 15, item 4): the demo's job gets a key's digest record,
never the key; the record is validated by name. Ray-free: nothing here starts a cluster."""

import json

import pytest

from cluster.config import ConfigError
from cluster.security import KEY_RECORD_ENV, ApiKeyRecord, Authenticator, SecuritySettings, key_record_from_env, new_api_key


def test_the_demo_job_gets_the_keys_record_never_the_key(monkeypatch):
    from scripts.demo import demo_key, submit_command

    for users_key in (None, new_api_key("me", ["admin"], "lakeforge", key_id="mine")[0]):
        if users_key is None:
            monkeypatch.delenv("LAKEFORGE_API_KEY", raising=False)
        else:  # a user's own key, set in the demo's shell: used by the demo, still never sent
            monkeypatch.setenv("LAKEFORGE_API_KEY", users_key)
        key, record = demo_key()
        assert users_key in (None, key)
        command = submit_command("http://127.0.0.1:8265", "lakeforge-demo-1", ["storage_root=/x"], record)
        secret = key[len(f"lf_{record.key_id}_"):]  # 43 random characters
        assert not any(key in arg or secret in arg for arg in command)  # argv, and so Ray's job metadata
        runtime_env = json.loads(command[command.index("--runtime-env-json") + 1])
        assert set(runtime_env["env_vars"]) == {KEY_RECORD_ENV}
        # What the job receives is a record the endpoint accepts the demo's key by.
        sent = key_record_from_env(runtime_env["env_vars"])
        assert sent == record and sent.roles == ["admin"]
        assert Authenticator(SecuritySettings(api_keys=[sent])).authenticate(f"Bearer {key}").key_id == record.key_id
        assert command[command.index("--") + 1:][:3] == ["python", "-m", "jobs.pipeline"]


def test_a_users_malformed_key_is_named():
    from scripts.demo import demo_key

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAKEFORGE_API_KEY", "not-a-lakeforge-key")
        with pytest.raises(ConfigError, match="LAKEFORGE_API_KEY must look like lf_<key_id>_<secret>"):
            demo_key()


def test_the_key_record_variable_is_parsed_strictly():
    key, record = new_api_key("demo", ["admin"], "lakeforge", key_id="demo")
    assert key_record_from_env({}) is None and key_record_from_env({KEY_RECORD_ENV: ""}) is None
    assert key_record_from_env({KEY_RECORD_ENV: record.model_dump_json()}) == record
    fields = json.loads(record.model_dump_json())
    bad = {
        "{not json": "Invalid JSON",
        json.dumps({**fields, "key": key}): "key: Extra inputs are not permitted",  # never the key itself
        json.dumps({k: v for k, v in fields.items() if k != "sha256"}): "sha256: Field required",
        json.dumps({**fields, "sha256": "abc"}): "sha256: String should match pattern",
        json.dumps({**fields, "roles": []}): "roles: List should have at least 1 item",
        json.dumps([fields]): "Input should be an object",
    }
    for raw, problem in bad.items():
        with pytest.raises(ConfigError) as error:
            key_record_from_env({KEY_RECORD_ENV: raw})
        assert str(error.value).startswith(f"{KEY_RECORD_ENV} is not a valid API key record") and problem in str(error.value)
        assert key not in str(error.value)


def test_the_key_record_command_prints_a_record_from_the_environment(monkeypatch, capsys):
    from cluster.security import main

    key, _ = new_api_key("x", ["admin"], "lakeforge", key_id="laptop")
    monkeypatch.setenv("LAKEFORGE_API_KEY", key)
    assert main(["key-record"]) == 0
    printed = capsys.readouterr().out
    record = ApiKeyRecord.model_validate_json(printed)
    assert key not in printed and record.key_id == "laptop" and record.roles == ["admin"]
    assert Authenticator(SecuritySettings(api_keys=[record])).authenticate(f"Bearer {key}").key_id == "laptop"
