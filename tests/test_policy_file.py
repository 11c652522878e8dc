"""The policy file as a contract: types and ranges checked on load, errors that name the place."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlmflow import ConfigurationError, Dispatcher, ScriptedModel
from rlmflow.cli import main


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
