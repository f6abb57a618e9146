"""``fama <command> --help`` names every ``FAMA_*`` variable the command reads, each flag with its own."""

from __future__ import annotations

import re

import pytest
from pydantic_settings import BaseSettings
from typer.testing import CliRunner

from detector_service.settings import DetectorSettings
from proxy.cli import app, env_names
from proxy.settings import ProxySettings


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], prog_name="fama", terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def _flag_variables(text: str) -> dict[str, str]:
    """Each option of the help's option list and the variable its ``[env var: ...]`` names (wrapped lines joined)."""
    options = text.split("Options:", 1)[1]
    found: dict[str, str] = {}
    for block in re.split(r"\n(?=  --)", options):
        if not block.strip():
            continue
        flag = block.split()[0]
        joined = " ".join(block.split())
        m = re.search(r"\[env var: ([A-Z0-9_]+)\]", joined)
        if m:
            found[flag] = m.group(1)
    return found


@pytest.mark.parametrize(("command", "settings"), [("serve", ProxySettings), ("detector", DetectorSettings)])
def test_help_names_every_variable_of_the_settings(command: str, settings: type[BaseSettings]) -> None:
    text = _help(command)
    words = set(re.findall(r"FAMA_[A-Z0-9_]+", text))
    missing = sorted(set(env_names(settings).values()) - words)
    assert not missing, f"fama {command} --help does not name {missing}"
    assert words <= set(env_names(settings).values()), (
        f"names no field has: {sorted(words - set(env_names(settings).values()))}"
    )


@pytest.mark.parametrize(
    ("command", "settings", "flags"),
    [
        ("serve", ProxySettings, {"--upstream-url", "--upstream-api-key", "--mode", "--port", "--local-model"}),
        ("detector", DetectorSettings, {"--redis-url", "--profile", "--metrics-port", "--log-level"}),
    ],
)
def test_each_flag_shows_the_variable_of_its_own_field(
    command: str, settings: type[BaseSettings], flags: set[str]
) -> None:
    shown = _flag_variables(_help(command))
    names = env_names(settings)
    assert flags <= set(shown), f"flags without their variable: {sorted(flags - set(shown))}"
    # A flag is named after its field (--upstream-url: upstream_url), so the variable beside it must be that field's.
    for flag, variable in shown.items():
        field = flag.removeprefix("--").replace("-", "_")
        assert names.get(field) == variable, f"{flag} shows {variable}"


def test_replay_help_names_the_judge_key_variable() -> None:
    assert env_names(DetectorSettings)["judge_api_key"] in _help("replay")


def test_a_bad_value_in_a_variable_is_named() -> None:
    """The variable the help shows is the one the flag falls back to."""
    runner = CliRunner()
    result = runner.invoke(app, ["serve"], prog_name="fama", env={"FAMA_MODE": "loud"})
    assert result.exit_code == 2
    assert "FAMA_MODE" in result.output
    assert "'loud'" in result.output
