"""The policy file as a contract: types and ranges checked on load, errors that name the place."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlmflow import ConfigurationError, Dispatcher, ScriptedModel
from rlmflow.cli import main
from rlmflow.dispatch.policy import load_policy


def load(tmp_path: Path, text: str) -> Dispatcher:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return Dispatcher.from_policy(path)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('[lanes.openai]\nmax_concurrency = 4.5\n', ["[lanes.'openai']", "max_concurrency", "an integer"]),
        ('[lanes.openai]\nmax_concurrency = true\n', ["max_concurrency", "a boolean"]),
        ('[lanes.openai]\nrpm = "600"\n', ["rpm", "a string"]),
        ('[lanes.openai]\nrpm = nan\n', ["rpm", "a finite number"]),
        ('[lanes.openai]\ntpm = inf\n', ["tpm"]),
        ('[lanes.openai]\nrpm = -5\n', ["[lanes.'openai']", "rpm"]),
        ('[lanes.openai]\nbackoff_ratio = 1.5\n', ["backoff_ratio"]),
        ('lanes = 5\n', ["lanes"]),
        ('[lanes]\nopenai = 3\n', ["[lanes.'openai']", "table"]),
        ('[lanes.openai]\nrpmm = 5\n', ["unknown key 'rpmm'", "rpm"]),
        ('[retry]\nmax_attempts = "3"\n', ["[retry]", "max_attempts"]),
        ('[shared]\nurl = 5\n', ["[shared]", "url", "a string"]),
        ('[shared]\nurl = "redis://127.0.0.1:1/0"\nlease = 0\n', ["[shared]", "lease"]),
        ('[limits]\nrpm = 5\n', ["unknown tables", "limits"]),
        ('[lanes."bedrock:m"]\nrpm = 1\n[lanes."aws.bedrock:m"]\nrpm = 2\n', ["a second time"]),
        ('[shared]\nlease = 5\n', ["[shared]", "missing key 'url'"]),
        # [sandbox]: where the root's code runs
        ('[sandbox]\nkind = "docker"\n', ["[sandbox]", "kind must be 'local' or 'agentcore'", "'docker'"]),
        ('[sandbox]\nkind = 5\n', ["[sandbox]", "kind must be a string", "an integer"]),
        ('[sandbox]\nregion = "us-east-1"\n', ["[sandbox]", "missing key 'kind'"]),
        ('[sandbox]\nkind = "agentcore"\nregoin = "us-east-1"\n', ["[sandbox]", "unknown key 'regoin'", "region"]),
        ('[sandbox]\nkind = "agentcore"\nregion = "moon"\n', ["[sandbox]", "region", "'moon' is not an AWS region"]),
        ('[sandbox]\nkind = "agentcore"\nregion = true\n', ["[sandbox]", "region must be a string", "a boolean"]),
        ('[sandbox]\nkind = "agentcore"\nidentifier = "my interpreter"\n', ["[sandbox]", "identifier",
                                                                            "'my interpreter'"]),
        ('[sandbox]\nkind = "agentcore"\nidentifier = ""\n', ["[sandbox]", "identifier"]),
        ('[sandbox]\nkind = "local"\nregion = "us-east-1"\n', ["[sandbox]", "region is for kind = 'agentcore'"]),
        ('sandbox = 5\n', ["[sandbox]", "expected a table", "an integer"]),
        ('sandbox = "agentcore:my-ci@us-east-1"\n', [
            "command line's syntax", 'sandbox = { kind = "agentcore", identifier = "my-ci", region = "us-east-1" }']),
        ('sandbox = "docker"\n', ["command line's syntax", "kind, identifier and region"]),
        ('[sandbox.agentcore]\nregion = "us-east-1"\n', ["[sandbox]", "unknown key 'agentcore'"]),
    ],
)
def test_bad_values_are_refused_on_load_naming_file_lane_and_key(tmp_path: Path, text: str, names: list[str]) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load(tmp_path, text)
    message = caught.value.message
    assert "policy.toml" in message
    for name in names:
        assert name in message


def test_good_values_load_with_integers_for_numbers(tmp_path: Path) -> None:
    text = "[lanes.openai]\nrpm = 600\ntpm = 1.5e6\nmax_concurrency = 4\n[retry]\nmax_attempts = 2\n"
    dispatcher = load(tmp_path, text)
    lane = dispatcher.lane(ScriptedModel(["x"], name="gpt", provider="openai"))
    assert (lane.limits.rpm, lane.limits.tpm, lane.limits.max_concurrency) == (600, 1.5e6, 4)
    assert dispatcher.retry.max_attempts == 2


def test_model_strings_key_the_lanes_they_stand_for(tmp_path: Path) -> None:
    dispatcher = load(tmp_path, '[lanes."bedrock:anthropic.claude"]\nrpm = 60\n[lanes.local]\nmax_concurrency = 1\n')
    bedrock = dispatcher.lane(ScriptedModel(["x"], name="anthropic.claude", provider="aws.bedrock"))
    local = dispatcher.lane(ScriptedModel(["x"], name="qwen", provider="llama.cpp"))
    assert bedrock.limits.rpm == 60 and local.limits.max_concurrency == 1


def test_code_arguments_accept_model_strings_too() -> None:
    from rlmflow import Limits

    dispatcher = Dispatcher(limits={"bedrock:m": Limits(rpm=7)})
    assert dispatcher.lane(ScriptedModel(["x"], name="m", provider="aws.bedrock")).limits.rpm == 7


def test_lanes_no_model_uses_are_refused_by_name(tmp_path: Path) -> None:
    dispatcher = load(tmp_path, '[lanes."openai:gpt-4o-mnii"]\nrpm = 5\n[lanes.openai]\nrpm = 9\n')
    models = [ScriptedModel(["x"], name="gpt-4o-mini", provider="openai")]
    with pytest.raises(ConfigurationError, match="openai:gpt-4o-mnii"):
        dispatcher.check_limits_used(models, source="the policy p.toml")
    load(tmp_path, "[lanes.openai]\nrpm = 9\n").check_limits_used(models)  # a provider-wide lane is used


def test_run_takes_a_policy_and_refuses_a_misspelled_lane(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    document = tmp_path / "doc.txt"
    document.write_text("a document")
    policy = tmp_path / "policy.toml"
    policy.write_text('[lanes."bedrock:no-such-model"]\nrpm = 5\n')
    code = main(["run", "--context", str(document), "--query", "q?", "--root", "openai:m@http://127.0.0.1:9/v1",
                 "--policy", str(policy)])
    assert code == 2
    assert "aws.bedrock:no-such-model" in capsys.readouterr().err
    policy.write_text("[lanes.openai]\nmax_concurrency = 4.5\n")
    assert main(["run", "--context", str(document), "--query", "q?", "--policy", str(policy)]) == 2
    assert "max_concurrency" in capsys.readouterr().err


def test_run_with_a_cost_cap_refuses_a_model_without_a_price_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    document = tmp_path / "doc.txt"
    document.write_text("a document")
    code = main(["run", "--context", str(document), "--query", "q?", "--root", "openai:my-vllm@http://127.0.0.1:9/v1",
                 "--max-cost", "1.0"])
    err = capsys.readouterr().err
    assert code == 2 and "no price is known" in err


# -- [sandbox]: where the root's code runs -------------------------------------------------------------
@pytest.mark.parametrize(
    ("table", "spec"),
    [
        ('kind = "local"', "local"),
        ('kind = "agentcore"', "agentcore"),
        ('kind = "agentcore"\nregion = "us-west-2"', "agentcore@us-west-2"),
        ('kind = "agentcore"\nidentifier = "my-ci_1.0"', "agentcore:my-ci_1.0"),
        ('kind = "agentcore"\nidentifier = "aws.codeinterpreter.v1"\nregion = "us-gov-west-1"',
         "agentcore:aws.codeinterpreter.v1@us-gov-west-1"),
    ],
)
def test_the_sandbox_table_loads_as_the_flag_it_stands_for(tmp_path: Path, table: str, spec: str) -> None:
    from rlmflow.sandbox.agentcore import parse_sandbox_string

    path = tmp_path / "policy.toml"
    path.write_text(f"[lanes.openai]\nrpm = 5\n[sandbox]\n{table}\n")
    policy = load_policy(path)
    assert policy.sandbox == spec and policy.limits["openai"].rpm == 5
    assert parse_sandbox_string(spec)  # the same grammar as --sandbox
    path.write_text(f"sandbox = {{ {table.replace(chr(10), ', ')} }}\n")  # an inline table is the same table
    assert load_policy(path).sandbox == spec
    path.write_text("[lanes.openai]\nrpm = 5\n")
    assert load_policy(path).sandbox is None  # no table: the command line's default


def test_the_flag_wins_over_the_file_and_the_file_over_the_default() -> None:
    from rlmflow.sandbox.choice import chosen_sandbox

    assert chosen_sandbox(None, None) == "local"
    assert chosen_sandbox(None, "agentcore@us-east-1") == "agentcore@us-east-1"
    assert chosen_sandbox("local", "agentcore@us-east-1") == "local"
    assert chosen_sandbox("agentcore:x", "agentcore@us-east-1") == "agentcore:x"


class _SandboxChosen(ConfigurationError):
    """Raised by the stand-in for build_sandbox: the command stops where it would build one."""


COMMANDS = {
    "run": ("rlmflow.cli", ["run", "--context", "{doc}", "--query", "q?"]),
    "eval": ("rlmflow.eval.cli", ["eval", "--dataset", "{dataset}", "--approach", "rlm", "--results", "{results}"]),
    "batch": ("rlmflow._batch_cli", ["batch", "--input", "{items}"]),
}
AGENTCORE_FILE = '[sandbox]\nkind = "agentcore"\nregion = "us-east-1"\n'


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize(
    ("flag", "file", "chosen"),
    [
        (None, None, "local"),
        (None, AGENTCORE_FILE, "agentcore@us-east-1"),
        (None, '[sandbox]\nkind = "local"\n', "local"),
        ("local", AGENTCORE_FILE, "local"),
        ("agentcore:other@eu-west-1", AGENTCORE_FILE, "agentcore:other@eu-west-1"),
    ],
)
def test_run_eval_and_batch_take_the_sandbox_from_the_policy_file_unless_the_flag_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str,
    flag: str | None, file: str | None, chosen: str,
) -> None:
    import importlib
    import json

    built: list[str] = []

    def build_sandbox(spec: str, **options: object) -> object:
        built.append(spec)
        raise _SandboxChosen(f"stopped at the sandbox {spec}")

    module, argv = COMMANDS[command]
    monkeypatch.setattr(importlib.import_module(module), "build_sandbox", build_sandbox)
    (tmp_path / "doc.txt").write_text("a document")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"id": "e1", "question": "q?", "context": "doc", "answer": "a"}))
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "query": "q?", "context": "doc"}))
    places = {"doc": tmp_path / "doc.txt", "dataset": tmp_path / "eval.jsonl", "items": tmp_path / "items.jsonl",
              "results": tmp_path / "results.jsonl"}
    args = [part.format(**places) for part in argv] + ["--root", "openai:m@http://127.0.0.1:9/v1"]
    if flag is not None:
        args += ["--sandbox", flag]
    if file is not None:
        (tmp_path / "policy.toml").write_text(file)
        args += ["--policy", str(tmp_path / "policy.toml")]
    assert main(args) == 2
    assert built == [chosen], capsys.readouterr().err
    assert f"stopped at the sandbox {chosen}" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_sandbox_table_stops_each_command_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    import json

    (tmp_path / "doc.txt").write_text("a document")
    (tmp_path / "eval.jsonl").write_text(json.dumps({"id": "e1", "question": "q?", "context": "doc", "answer": "a"}))
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "query": "q?", "context": "doc"}))
    places = {"doc": tmp_path / "doc.txt", "dataset": tmp_path / "eval.jsonl", "items": tmp_path / "items.jsonl",
              "results": tmp_path / "results.jsonl"}
    policy = tmp_path / "policy.toml"
    policy.write_text('[sandbox]\nkind = "agentcore"\nregion = "moon"\n')
    args = [part.format(**places) for part in COMMANDS[command][1]]
    assert main([*args, "--root", "openai:m@http://127.0.0.1:9/v1", "--policy", str(policy)]) == 2
    err = capsys.readouterr().err
    assert "policy.toml" in err and "[sandbox]" in err and "region" in err and "'moon'" in err, err


def test_the_documented_policy_file_loads(tmp_path: Path) -> None:
    """docs/policies.md's example, every table of it, is a valid policy."""
    import re

    docs = Path(__file__).resolve().parents[1] / "docs" / "policies.md"
    example = re.search(r"```toml\n(.*?)```", docs.read_text(encoding="utf-8"), re.S)
    assert example is not None
    path = tmp_path / "policy.toml"
    path.write_text(example.group(1), encoding="utf-8")
    policy = load_policy(path)
    assert policy.sandbox == "agentcore:aws.codeinterpreter.v1@us-east-1"
    assert policy.retry is not None and policy.shared is not None
    assert policy.limits["openai"].max_concurrency == 32


# -- [cache] -----------------------------------------------------------------------------------------
def test_a_cache_table_names_its_file_relative_to_the_policy(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    policy = folder / "policy.toml"
    policy.write_text('[cache]\npath = "answers.sqlite"\nttl = 3600\nmax_bytes = 1_000_000\nroots = false\n')
    settings = load_policy(policy).cache
    assert settings is not None
    assert (settings.path, settings.ttl, settings.max_bytes, settings.roots) == (
        str(folder / "answers.sqlite"), 3600, 1_000_000, False)
    policy.write_text('[cache]\nurl = "redis://127.0.0.1:6379/0"\nmax_entries = 10\n')
    settings = load_policy(policy).cache
    assert settings is not None and (settings.url, settings.max_entries, settings.roots) == (
        "redis://127.0.0.1:6379/0", 10, True)


@pytest.mark.parametrize(("table", "says"), [
    ("ttl = 60", "path"),
    ('path = "a"\nurl = "redis://h/0"', "one of them"),
    ('path = "a"\nttl = 0', "ttl"),
    ('path = "a"\nroots = "yes"', "roots must be true or false"),
    ('path = "a"\nmax_bytes = 1.5', "max_bytes must be an integer"),
    ('path = "a"\nmax_entries = 5', "max_entries caps a Redis cache"),
    ('url = "redis://h/0"\nmax_bytes = 5', "max_bytes caps an SQLite cache"),
    ('path = "a"\nsize = 5', "unknown key 'size'"),
])
def test_a_bad_cache_table_is_an_error_naming_the_table_and_key(tmp_path: Path, table: str, says: str) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(f"[cache]\n{table}\n")
    with pytest.raises(ConfigurationError, match=r"\[cache\]") as caught:
        load_policy(policy)
    assert says in str(caught.value)
