"""Settings declared once (dynamo_run/settings.py): the layers flag > environment > config
file > default, the config file's errors, the enumerations, and the generated ``--help``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import run_cli

from dynamo_run.settings import (
    GenerationConfig,
    Panel,
    RouterMode,
    Settings,
    SpecError,
    declared,
    resolve,
    validate,
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- every layer of the precedence ----------------------------------------------------------


def test_default_layer():
    assert resolve({}, {}) == Settings()
    assert Settings().http_port == 8000 and Settings().router_mode is RouterMode.ROUND_ROBIN


def test_file_over_default_toml_and_yaml(tmp_path):
    toml = write(
        tmp_path,
        "run.toml",
        'http-port = 9000\nrouter_mode = "kv"\nkv-events = false\n'
        'kv-overlap-score-weight = 2\noutput = "~/out.jsonl"\n',
    )
    settings = resolve({}, {}, toml)
    assert settings.http_port == 9000
    assert settings.router_mode is RouterMode.KV  # an enum, equal to its name too
    assert settings.router_mode == "kv"
    assert settings.kv_events is False
    assert settings.kv_overlap_score_weight == 2.0
    assert settings.output == Path.home() / "out.jsonl"
    yaml = write(tmp_path, "run.yaml", "generation-config: none\nverbose: debug\nprompt: hi\n")
    settings = resolve({}, {}, yaml)
    assert settings.generation_config is GenerationConfig.NONE
    assert settings.verbosity == 2  # a DYN_LOG level name works in the file as well
    assert settings.prompt == "hi"
    assert settings.http_port == 8000  # not in the file: the default


def test_environment_over_file(tmp_path):
    config = write(tmp_path, "run.toml", 'api-key = "file"\nnats-url = "nats://file:4222"\n')
    env = {"DYN_API_KEY": "env", "NATS_SERVER": "nats://env:4222"}
    settings = resolve({}, env, config)
    assert (settings.api_key, settings.nats_url) == ("env", "nats://env:4222")
    assert resolve({}, {"DYN_API_KEY": ""}, config).api_key == "file"  # empty: unset


def test_flag_over_environment(tmp_path):
    config = write(tmp_path, "run.toml", 'api-key = "file"\nverbose = 1\n')
    settings = resolve(
        {"api_key": "flag", "verbosity": 0}, {"DYN_API_KEY": "env", "DYN_LOG": "debug"}, config
    )
    assert (settings.api_key, settings.verbosity) == ("flag", 0)


# --- one-line errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.toml", "htp-port = 80\n", "unknown setting 'htp-port' (did you mean 'http-port'?)"),
        ("a.toml", 'http-port = "many"\n', "http-port = 'many': expected an integer"),
        ("a.toml", "http-port = true\n", "expected an integer"),
        ("a.toml", "http-port = 0\n", "http-port = 0: must be between 1 and 65535"),
        ("a.toml", 'router-mode = "kvv"\n', "unknown mode (did you mean 'kv'?)"),
        ("a.toml", "kv-events = 3\n", "expected true or false"),
        ("a.toml", "model-name = 5\n", "expected a string"),
        ("a.toml", "http-port = \n", "invalid TOML"),
        ("a.yaml", "http-port: [1\n", "invalid YAML"),
        ("a.yaml", "- http-port\n", "expected a table of settings"),
        ("a.yaml", "tool-call-parser: hermez\n", "unknown parser (did you mean 'hermes'?)"),
    ],
)
def test_config_file_errors_name_the_file_and_key(tmp_path, name, text, message):
    config = write(tmp_path, name, text)
    with pytest.raises(SpecError) as err:
        resolve({}, {}, config)
    assert str(err.value).startswith(f"--config {config}: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_config_file_missing(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        resolve({}, {}, tmp_path / "missing.toml")


def test_environment_errors_name_the_variable():
    with pytest.raises(SpecError, match=r"^DYN_LOG=loud: unknown log level 'loud'"):
        resolve({}, {"DYN_LOG": "loud"})


def test_choices_are_enumerations():
    settings = validate(Settings(router_mode="kv", generation_config="none"))
    assert settings.router_mode is RouterMode.KV
    assert settings.generation_config is GenerationConfig.NONE
    assert f"{settings.router_mode}" == "kv" and str(RouterMode.ROUND_ROBIN) == "round-robin"


def test_every_setting_is_declared_with_help_and_panel():
    names = [d.name for d in declared()]
    assert len(names) == len(set(names))
    for d in declared():
        assert d.meta.help and isinstance(d.meta.panel, Panel), d.name


# --- the real command line ----------------------------------------------------------------------


def test_cli_file_then_flag_for_the_prompt(tmp_path):
    """out=echo answers with the prompt it was given: the file's, unless -p overrides it."""
    config = write(tmp_path, "run.toml", 'prompt = "words from the file"\n')
    result = run_cli("out=echo", "--config", str(config), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "words from the file" in result.stdout
    result = run_cli("out=echo", "--config", str(config), "-p", "words from the flag", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "words from the flag" in result.stdout and "from the file" not in result.stdout


LOG_LINE = re.compile(r" (DEBUG|INFO) ")


def test_cli_dyn_log_debug_logs_at_debug():
    """The README pairs DYN_LOG=debug with -vv: debug lines, not only info ones."""
    result = run_cli("out=echo", "-p", "hi", env={"DYN_LOG": "debug"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert " DEBUG " in result.stderr
    result = run_cli("out=echo", "-p", "hi", env={"DYN_LOG": "info"}, timeout=60)
    assert " INFO " in result.stderr and " DEBUG " not in result.stderr


def test_cli_environment_over_file_and_flag_over_environment(tmp_path):
    config = write(tmp_path, "run.toml", 'verbose = "debug"\n')
    quiet = run_cli("out=echo", "-p", "hi", "--config", str(config), env={"DYN_LOG": "error"})
    assert quiet.returncode == 0, quiet.stderr
    assert not LOG_LINE.search(quiet.stderr), quiet.stderr  # DYN_LOG=error beat the file
    loud = run_cli("out=echo", "-p", "hi", "-v", "--config", str(config), env={"DYN_LOG": "error"})
    assert loud.returncode == 0, loud.stderr
    assert " INFO " in loud.stderr and " DEBUG " not in loud.stderr  # -v beat DYN_LOG


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("htp-port = 80\n", "unknown setting 'htp-port' (did you mean 'http-port'?)"),
        ('http-port = "many"\n', "expected an integer"),
        (None, "no such file"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(tmp_path, text, needle):
    config = tmp_path / "run.toml"
    if text is not None:
        config.write_text(text)
    result = run_cli("out=echo", "-p", "hi", "--config", str(config), timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"dynamo-run: error: --config {config}: {needle}"] or (
        len(lines) == 1 and needle in lines[0]
    ), result.stderr


def test_cli_both_forms_of_a_flag_is_one_line():
    result = run_cli("out=echo", "-p", "hi", "--kv-events", "--no-kv-events", timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dynamo-run: error: --kv-events and --no-kv-events both given; choose one"
    )


def test_cli_help_at_80_columns_has_panels_and_whole_flag_names():
    result = run_cli("--help", env={"COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    words = set(re.findall(r"-{1,2}[a-z][a-z0-9-]*", result.stdout))
    for d in declared():
        for flag in d.meta.flags or (d.flag,):
            assert flag in words, f"{flag} missing or cut short in --help at 80 columns"
    assert "--config" in words
    for panel in Panel:
        assert re.search(rf"╭─ {panel.value} ─", result.stdout), panel
    assert "…" not in result.stdout


def test_cli_negated_flag_overrides_the_file(tmp_path):
    """A flag the file turns on is turned back off with --no-NAME (hidden in help)."""
    batch = write(tmp_path, "in.jsonl", '{"text": "hi"}\n')
    output = tmp_path / "out.jsonl"
    config = write(tmp_path, "run.toml", f'overwrite = true\noutput = "{output}"\n')
    args = (f"in=batch:{batch}", "out=echo", "--config", str(config))
    for _ in range(2):  # the file's overwrite = true: each run starts afresh
        result = run_cli(*args, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "resuming" not in result.stderr and output.is_file()
    result = run_cli(*args, "--no-overwrite", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "resuming: 1 of 1 lines already in" in result.stderr


def test_readme_flag_table_lists_every_setting_in_its_panel():
    """README's table is kept by hand: every declared flag and variable, under its panel."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("### Flags, environment and config file", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    panel = None
    for d in declared():
        matches = [i for i, row in enumerate(rows) if f"`{d.flag}" in row or f"{d.flag}`" in row]
        assert matches, f"README's flag table lacks {d.flag}"
        row = rows[matches[0]]
        heading = next(r for r in reversed(rows[: matches[0]]) if r.startswith("| **"))
        assert heading.startswith(f"| **{d.meta.panel.value}**"), (d.flag, heading)
        if d.meta.env:
            assert f"`{d.meta.env}`" in row, (d.flag, d.meta.env)
        panel = d.meta.panel
    assert panel is Panel.LOGGING


def test_ps_takes_the_nats_settings_from_the_same_declaration(tmp_path):
    """`dynamo-run ps` shares --nats-url / NATS_SERVER and --config with the run command, and
    its errors exit non-zero (a bad file 2, an unreachable server 1)."""
    result = run_cli("ps", "--config", str(tmp_path / "missing.toml"), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("missing.toml: no such file")
    config = write(tmp_path, "run.yaml", "nats-url: nats://127.0.0.1:1\n")
    for args, env in ((["--config", str(config)], {}), ([], {"NATS_SERVER": "nats://127.0.0.1:1"})):
        result = run_cli("ps", *args, env=env, timeout=60)
        assert result.returncode == 1, result.stderr
        assert "cannot connect to NATS at nats://127.0.0.1:1" in result.stderr
