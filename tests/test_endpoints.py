"""Endpoint configuration: loading, validation errors that name file and field, secrets kept out."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from agents.endpoints import (
    DEFAULT_LOCAL_BASE_URL,
    LOCAL_URL_ENV,
    Endpoint,
    EndpointsConfig,
    default_local_config,
    load_config,
)
from agents.errors import ConfigError, UnknownEndpoint
from budgets.money import Price

SECRET = "sk-test-0123456789abcdefSECRET"

GOOD = """
default = "gpt4o-mini"
manager = "gpt4o"
worker = "local"

[[endpoints]]
name = "gpt4o-mini"
base_url = "https://api.openai.com/v1"
model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"
input_usd_per_mtok = "0.15"
output_usd_per_mtok = "0.60"
kind = "remote"
tier = 2
structured_output = "json_schema"

[[endpoints]]
name = "gpt4o"
base_url = "https://api.openai.com/v1/"
model = "gpt-4o"
api_key_env = "OPENAI_API_KEY"
input_usd_per_mtok = "2.50"
output_usd_per_mtok = "10.00"
kind = "remote"
tier = 4

[[endpoints]]
name = "local"
base_url = "http://localhost:8000/v1"
model = "qwen"
kind = "local"
max_concurrency = 1
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "endpoints.toml"
    path.write_text(text, encoding="utf-8")
    return path


def endpoint_toml(**fields: str) -> str:
    """One endpoint's table, valid unless ``fields`` overrides a line."""
    base = {
        "name": '"e1"',
        "base_url": '"https://example.test/v1"',
        "model": '"m"',
        "kind": '"remote"',
    }
    base.update(fields)
    body = "\n".join(f"{k} = {v}" for k, v in base.items())
    return f"[[endpoints]]\n{body}\n"


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    return info.value


def test_good_config_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    assert config.names() == ["gpt4o-mini", "gpt4o", "local"]
    mini = config.get("gpt4o-mini")
    assert mini.input_usd_per_mtok == Decimal("0.15")
    assert mini.price == Price.of("0.15", "0.60")
    assert mini.price.cost_nanos(input_tokens=1_000_000, output_tokens=0) == 150_000_000
    assert mini.structured_output == "json_schema"
    assert config.get("gpt4o").base_url == "https://api.openai.com/v1"  # trailing / dropped
    local = config.get("local")
    assert (local.context_window, local.max_concurrency, local.tier) == (8192, 1, 1)
    assert (local.timeout_s, local.max_retries, local.price.is_free) == (60.0, 3, True)
    assert config.default_endpoint is mini
    assert (config.manager, config.worker) == ("gpt4o", "local")


def test_cached_tokenizer_and_output_cap_settings_load(tmp_path: Path) -> None:
    text = endpoint_toml(
        input_usd_per_mtok='"2.50"',
        output_usd_per_mtok='"10"',
        cached_input_usd_per_mtok='"1.25"',
        tokenizer='"tiktoken:cl100k_base"',
        max_tokens_param='"max_completion_tokens"',
    )
    e = load_config(write(tmp_path, text), env={}).endpoints[0]
    assert (e.tokenizer, e.max_tokens_param) == ("tiktoken:cl100k_base", "max_completion_tokens")
    # 400k uncached at 2.50, 600k cached at 1.25, 1k out at 10: exact nano-dollars.
    assert e.cost_nanos(input_tokens=10**6, output_tokens=1000, cached_tokens=600_000) == (
        1_000_000_000 + 750_000_000 + 10_000_000
    )
    plain = load_config(write(tmp_path, endpoint_toml(input_usd_per_mtok='"0.1234567"')), env={})
    cheap = plain.endpoints[0]
    assert (cheap.tokenizer, cheap.max_tokens_param, cheap.cached_input_usd_per_mtok) == (
        None,
        "max_tokens",
        None,
    )
    for tokens in (0, 1, 7, 999_999):  # unset: cached tokens cost the input price
        assert cheap.cost_nanos(input_tokens=tokens, output_tokens=3, cached_tokens=tokens) == (
            cheap.price.cost_nanos(input_tokens=tokens, output_tokens=3)
        )
    with pytest.raises(ValueError, match="exceed"):
        cheap.cost_nanos(input_tokens=1, output_tokens=0, cached_tokens=2)


def test_float_prices_are_exact(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, endpoint_toml(input_usd_per_mtok="0.15")), env={})
    assert config.endpoints[0].input_usd_per_mtok == Decimal("0.15")


def test_unknown_endpoint_name(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    with pytest.raises(UnknownEndpoint, match="gpt4o-mini, gpt4o, local"):
        config.get("nope")


@pytest.mark.parametrize(
    ("text", "field", "why"),
    [
        (endpoint_toml() + endpoint_toml(), "endpoints", "duplicate name 'e1'"),
        ('default = "zz"\n' + endpoint_toml(), "default: no endpoint named 'zz'", "e1"),
        ('manager = "zz"\n' + endpoint_toml(), "manager: no endpoint named 'zz'", "e1"),
        (endpoint_toml(base_url='"ftp://example.test"'), "endpoints[0].base_url", "http"),
        (endpoint_toml(base_url='"not a url"'), "endpoints[0].base_url", "http"),
        (
            endpoint_toml() + endpoint_toml(name='"e2"', input_usd_per_mtok='"-1"'),
            "endpoints[1].input_usd_per_mtok",
            "greater than or equal to 0",
        ),
        (endpoint_toml(output_usd_per_mtok='"lots"'), "endpoints[0].output_usd_per_mtok", ""),
        (endpoint_toml(kind='"cloud"'), "endpoints[0].kind", "'local' or 'remote'"),
        (endpoint_toml(tier="7"), "endpoints[0].tier", "less than or equal to 5"),
        (endpoint_toml(max_concurrency="0"), "endpoints[0].max_concurrency", ""),
        (endpoint_toml(name='"has space"'), "endpoints[0].name", "pattern"),
        (endpoint_toml(colour='"red"'), "endpoints[0].colour", "not permitted"),
        (
            endpoint_toml(input_usd_per_mtok='"1"', cached_input_usd_per_mtok='"2"'),
            "endpoints[0]",
            "must not exceed input_usd_per_mtok",
        ),
        (endpoint_toml(tokenizer='"sentencepiece"'), "endpoints[0].tokenizer", "pattern"),
        (endpoint_toml(tokenizer='"tiktoken:"'), "endpoints[0].tokenizer", "pattern"),
        (endpoint_toml(max_tokens_param='"max_new_tokens"'), "endpoints[0].max_tokens_param", ""),
        ("endpoints = []\n", "endpoints", "at least 1"),
        ('default = "x"\n', "endpoints", "required"),
    ],
)
def test_bad_field_names_file_and_field(tmp_path: Path, text: str, field: str, why: str) -> None:
    error = load_error(tmp_path, text)
    assert field in str(error)
    assert why in str(error)
    assert any(p.startswith(field.split(":")[0]) for p in error.problems)


def test_every_bad_field_is_reported(tmp_path: Path) -> None:
    text = endpoint_toml(kind='"cloud"') + endpoint_toml(name='"e2"', base_url='"ftp://x"')
    error = load_error(tmp_path, text)
    assert [p.split(":")[0] for p in error.problems] == [
        "endpoints[0].kind",
        "endpoints[1].base_url",
    ]


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[[endpoints]]\nname = \n")
    assert "not valid TOML" in str(error)
    assert "line 2" in str(error)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "absent.toml", env={})


def test_api_key_comes_from_the_passed_env(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), env={})
    assert config.get("gpt4o").api_key({"OPENAI_API_KEY": SECRET}) == SECRET
    assert config.get("local").api_key({}) is None


def test_missing_api_key_names_the_variable_not_a_value(tmp_path: Path) -> None:
    endpoint = load_config(write(tmp_path, GOOD), env={}).get("gpt4o")
    for env in ({}, {"OPENAI_API_KEY": ""}, {"OTHER": SECRET}):
        with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set") as info:
            endpoint.api_key(env)
        assert SECRET not in str(info.value)


def test_key_never_in_repr_dump_or_errors(tmp_path: Path) -> None:
    endpoint = load_config(write(tmp_path, GOOD), env={}).get("gpt4o-mini")
    assert endpoint.api_key({"OPENAI_API_KEY": SECRET}) == SECRET
    assert SECRET not in repr(endpoint)
    assert SECRET not in str(endpoint)
    assert SECRET not in endpoint.model_dump_json()


@pytest.mark.parametrize(
    "fields",
    [
        {"api_key": f'"{SECRET}"'},  # pasted into the file
        {"api_key_env": f'"{SECRET}"'},  # the key where its variable's name belongs
        {"base_url": f'"https://user:{SECRET}@example.test/v1"'},
    ],
)
def test_a_key_pasted_into_the_file_is_not_echoed(tmp_path: Path, fields: dict[str, str]) -> None:
    error = load_error(tmp_path, endpoint_toml(**fields))
    assert SECRET not in str(error)
    assert SECRET not in repr(error.problems)
    assert error.__cause__ is None  # pydantic's error, which prints inputs, is not chained


def test_ordered_fallbacks_same_or_higher_tier_cheapest_first() -> None:
    def ep(name: str, tier: int, usd_in: str, usd_out: str) -> Endpoint:
        return Endpoint(
            name=name,
            base_url="http://localhost:1/v1",
            model=name,
            kind="remote",
            tier=tier,
            input_usd_per_mtok=Decimal(usd_in),
            output_usd_per_mtok=Decimal(usd_out),
        )

    config = EndpointsConfig(
        endpoints=[
            ep("weak", 1, "0", "0"),
            ep("mid-pricey", 2, "3", "12"),
            ep("start", 2, "1", "2"),
            ep("strong-cheap", 4, "0.5", "1"),
            ep("mid-cheap", 2, "0.1", "0.2"),
            ep("strong-tie", 3, "0.5", "1"),
        ]
    )
    names = [e.name for e in config.ordered_fallbacks("start")]
    assert names == ["start", "mid-cheap", "strong-tie", "strong-cheap", "mid-pricey"]
    assert [e.name for e in config.ordered_fallbacks("strong-cheap")] == ["strong-cheap"]


def test_path_none_is_the_embedded_local_default() -> None:
    config = load_config(None, env={})
    local = config.default_endpoint
    assert (local.name, local.model, local.kind) == ("smollm2", "SmolLM2-135M-Instruct", "local")
    assert local.base_url == DEFAULT_LOCAL_BASE_URL
    assert (local.max_concurrency, local.context_window, local.structured_output) == (
        1,
        2048,
        "json_object",
    )
    assert local.price.is_free
    moved = load_config(None, env={LOCAL_URL_ENV: "http://127.0.0.1:9999/v1"})
    assert moved.default_endpoint.base_url == "http://127.0.0.1:9999/v1"


def test_default_local_config_uses_the_given_url() -> None:
    config = default_local_config("http://127.0.0.1:5555/v1/")
    assert config.get("smollm2").base_url == "http://127.0.0.1:5555/v1"


def test_documented_examples_load(tmp_path: Path) -> None:
    doc = (Path(__file__).parents[1] / "docs" / "endpoints.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", doc, flags=re.DOTALL)
    assert len(blocks) >= 4
    for block in blocks:
        config = load_config(write(tmp_path, block), env={})
        assert config.endpoints
