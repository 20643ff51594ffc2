"""The `lakeforge` command (jobs/cli.py): every command's help, the config keys a job's help lists
(from the same models that validate the config), and dispatch to the entry modules with the argv
`python -m jobs.<name>` would get. No Ray: the job entry modules are replaced by stand-ins that
record their argv; the key and audit commands run for real (they are quick)."""

import json
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import yaml

from cluster.audit import AuditLog
from cluster.security import ApiKeyRecord, hash_key
from jobs import cli

REPO = Path(__file__).resolve().parents[1]
TOOL_HELP = [["cluster"], ["keys"], ["keys", "new"], ["keys", "record"], ["audit"], ["audit", "verify"]]


def test_pip_installs_the_command():
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"] == {"lakeforge": "jobs.cli:main"}


def test_lakeforge_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lakeforge")
    for command in [*cli.JOBS, "cluster", "keys", "audit"]:
        assert f"\n    {command} " in result.stdout, command


@pytest.mark.parametrize("words", [[command] for command in cli.JOBS] + TOOL_HELP, ids=" ".join)
def test_every_command_has_help(words, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main([*words, "--help"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lakeforge {' '.join(words)}")


@pytest.mark.parametrize("command", list(cli.JOBS))
def test_a_jobs_help_lists_its_configs_keys(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and " (" in line}
    model = cli.JOBS[command].config
    for name in model.model_fields:  # each field, itself or through its dotted keys
        assert name in listed or any(key.startswith(f"{name}.") for key in listed), name


def test_the_help_shows_the_defaults_a_job_sees(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    lines = capsys.readouterr().out.splitlines()

    def line(key: str) -> str:
        return next(text for text in lines if text.startswith(f"  {key} ("))

    # Set by RunConfig's validator (twice data.max_seq_len) and by EndpointSettings' security factory.
    assert "default 512)" in line("serve.endpoint.max_model_len")
    assert 'default ["/-/healthz", "/health"])' in line("serve.endpoint.security.open_routes")
    assert '1, 2, 3; default 1)' in line("train.zero_stage")
    assert line("tasks").startswith("  tasks (list[TaskSection]; default [])")


@pytest.fixture
def entries(monkeypatch) -> list:
    """Stand-ins for the entry modules (and the local cluster tool): each records (module, argv)."""
    calls = []
    for module in [f"jobs.{job.module}" for job in cli.JOBS.values()] + ["cluster.ray_cluster"]:
        stand_in = types.ModuleType(module)
        stand_in.main = lambda argv, module=module: calls.append((module, argv))
        monkeypatch.setitem(sys.modules, module, stand_in)
    return calls


DISPATCH = [
    (["run", "configs/airline_sentiment.yaml", "train.max_steps=3", "data.labels=[a, b]"], "jobs.pipeline",
     ["--config", "configs/airline_sentiment.yaml", "train.max_steps=3", "data.labels=[a, b]"]),
    (["finetune", "run.yaml"], "jobs.finetune", ["--config", "run.yaml"]),
    (["evaluate", "run.yaml", "eval.max_test_examples=50"], "jobs.evaluate", ["--config", "run.yaml", "eval.max_test_examples=50"]),
    (["explain", "run.yaml"], "jobs.explain", ["--config", "run.yaml"]),
    (["batch", "configs/batch_infer/tweets.yaml", "output=out"], "jobs.batch_infer",
     ["--config", "configs/batch_infer/tweets.yaml", "output=out"]),
    (["deploy", "configs/deploy.yaml", "version=v0002", "force=true"], "jobs.deploy",
     ["--config", "configs/deploy.yaml", "version=v0002", "force=true"]),
    (["monitor", "configs/monitoring/monitor.yaml", "windows=14"], "jobs.monitor",
     ["--config", "configs/monitoring/monitor.yaml", "windows=14"]),
    (["cluster", "up"], "cluster.ray_cluster", ["up"]),
    (["cluster", "down"], "cluster.ray_cluster", ["down"]),
    (["cluster", "status"], "cluster.ray_cluster", ["status"]),
]


@pytest.mark.parametrize("argv, module, entry_argv", DISPATCH, ids=[" ".join(case[0]) for case in DISPATCH])
def test_each_command_calls_its_entry_with_the_argv_of_its_module_form(entries, argv, module, entry_argv):
    assert cli.main(argv) == 0
    assert entries == [(module, entry_argv)]


def test_a_bad_config_stops_with_one_line_and_exit_2_through_the_real_entry(capsys):
    # jobs.deploy checks its config before it starts or joins a cluster.
    with pytest.raises(SystemExit) as stopped:
        cli.main(["deploy", str(REPO / "configs" / "deploy.yaml"), "nam=x"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["config error: invalid config: nam: unknown key"]


def test_unknown_commands_and_actions_are_refused():
    for argv in (["train", "x.yaml"], ["cluster", "restart"], ["run"]):
        with pytest.raises(SystemExit) as stopped:
            cli.main(argv)
        assert stopped.value.code == 2


def test_keys_new_prints_the_key_once_and_a_record_holding_only_its_digest(capsys):
    assert cli.main(["keys", "new", "--subject", "crm", "--role", "app", "--tenant", "acme", "--key-id", "crm-2"]) == 0
    out = capsys.readouterr().out
    key = out.splitlines()[1]
    assert key.startswith("lf_crm-2_")
    record_text = out.split("holds only the key's SHA-256):\n", 1)[1]
    [record] = yaml.safe_load(record_text)
    assert ApiKeyRecord.model_validate(record).sha256 == hash_key(key) and key not in record_text


def test_keys_record_reads_the_key_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("LAKEFORGE_API_KEY", "lf_mine_" + "x" * 43)
    assert cli.main(["keys", "record", "--tenant", "acme"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["key_id"] == "mine" and record["tenant"] == "acme" and record["sha256"] == hash_key("lf_mine_" + "x" * 43)


def test_audit_verify_checks_the_chain(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for number in range(3):
        log.append({"event": "request", "status": 200 + number})
    assert cli.main(["audit", "verify", str(path)]) == 0
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[2]]) + "\n")  # a deleted line
    assert cli.main(["audit", "verify", str(path)]) == 1
