"""Help with the config: did-you-mean for unknown keys and sections, `config example`, `config show`, `--help`."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest

from proxy.config import load_config, parse_config
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent


async def test_config_help_misspelt_key_exits_2_suggesting_the_key(tmp_path: Path) -> None:
    """A misspelt key in [token] is named with the key it was likely meant to be."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "https://api.example.com"\n[token]\ngrant = "static"\naccess_token = "x"\nclientid = "a"\n'
    )
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, out, err) == (2, "", "config: token.clientid: unknown key; did you mean client_id?\n")


async def test_config_help_misspelt_section_exits_2_calling_it_a_section(tmp_path: Path) -> None:
    """A misspelt section header is called a section and given the section it was likely meant to be."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "https://api.example.com"\n[token]\ngrant = "static"\naccess_token = "x"\n[tokne]\nscope = "a"\n'
    )
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, out, err) == (2, "", "config: [tokne]: unknown section; did you mean [token]?\n")


async def test_config_help_misspelt_subsection_exits_2_naming_it_dotted(tmp_path: Path) -> None:
    """A misspelt table inside a section is named by its dotted header, with the one it was likely meant to be."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "https://api.example.com"\n[token]\ngrant = "static"\naccess_token = "x"\n[token.jsno]\nurl = ""\n'
    )
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, out, err) == (2, "", "config: [token.jsno]: unknown section; did you mean [token.json]?\n")


async def test_config_help_unknown_key_nothing_close_has_no_suggestion(tmp_path: Path) -> None:
    """An unknown key like no valid one gets no guess, and an unknown section none either."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "https://api.example.com"\nzzz = 1\n[token]\ngrant = "static"\naccess_token = "x"\n[qqq]\n'
    )
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, out, err) == (2, "", "config: [qqq]: unknown section\nconfig: upstream.zzz: unknown key\n")


async def test_config_help_example_prints_the_example_file_byte_for_byte() -> None:
    """`tokenproxy config example` prints config.example.toml exactly, from the copy inside the package."""
    code, out, err = await run_cli("config", "example")
    assert (code, err) == (0, "")
    assert out == (ROOT / "config.example.toml").read_text(encoding="utf-8")


def test_config_help_packaged_example_is_the_root_file() -> None:
    """The example the package ships (read as package data) is byte-identical to config.example.toml."""
    packaged = resources.files("proxy.config").joinpath("example.toml").read_bytes()
    assert packaged == (ROOT / "config.example.toml").read_bytes()


SHOWN_CONFIG = """
[upstream]
url = "https://api.example.com/v$$1"
[token]
grant = "json"
token_url = "https://auth.example.com/token"
refresh_token = "${SHOW_REFRESH}"
[token.json]
headers = { Authorization = "Bearer hdr-secret-4711", Accept = "application/json" }
body = '{"refreshToken": "{refresh_token}", "pin": "pin-secret-4711"}'
[server]
client_token = "client-token-secret-4711"
"""
SHOW_ENV = {"SHOW_REFRESH": "refresh-secret-4711"}


async def test_config_help_show_fills_defaults_and_never_prints_a_secret(tmp_path: Path) -> None:
    """`config show` prints TOML with every default, each secret that is set as <set>, and no secret's value."""
    path = tmp_path / "c.toml"
    path.write_text(SHOWN_CONFIG)
    path.chmod(0o600)
    code, out, err = await run_cli("config", "show", "-c", str(path), env=SHOW_ENV)
    assert (code, err) == (0, "")
    shown = tomllib.loads(out)
    assert shown["server"]["listen"] == "127.0.0.1:8080"
    assert shown["server"]["socket_mode"] == 0o600
    assert shown["queue"] == {"max_waiting": 1000, "wait_timeout": 30.0}
    assert shown["token"]["refresh_on"] == [401]
    assert shown["token"]["state_file"] == str(Path("~/.local/state/tokenproxy/state.json").expanduser())
    assert shown["token"]["json"]["method"] == "POST"
    assert shown["upstream"]["url"] == "https://api.example.com/v$$1"
    assert shown["server"]["client_token"] == "<set>"
    assert shown["token"]["refresh_token"] == "<set>"
    assert shown["token"]["json"]["headers"] == {"Authorization": "<set>", "Accept": "application/json"}
    assert shown["token"]["json"]["body"] == "<set>"
    assert "secret-4711" not in out


async def test_config_help_show_reads_back_as_the_same_config(tmp_path: Path) -> None:
    """What `config show` prints, with the secrets put back in place of <set>, loads as the config it came from."""
    path = tmp_path / "c.toml"
    path.write_text(SHOWN_CONFIG)
    path.chmod(0o600)
    code, out, _ = await run_cli("config", "show", "-c", str(path), env=SHOW_ENV)
    assert code == 0
    shown = tomllib.loads(out)
    shown["server"]["client_token"] = "client-token-secret-4711"
    shown["token"]["refresh_token"] = "refresh-secret-4711"
    shown["token"]["json"]["headers"]["Authorization"] = "Bearer hdr-secret-4711"
    shown["token"]["json"]["body"] = '{"refreshToken": "{refresh_token}", "pin": "pin-secret-4711"}'
    assert parse_config(shown, {}) == load_config(path, env=SHOW_ENV)


async def test_config_help_show_of_defaults_reads_back_unchanged(tmp_path: Path) -> None:
    """With no secret set, `config show`'s output is itself a config that loads as the one shown (empty secrets stay empty)."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "https://api.example.com"\n[token]\ngrant = "client_credentials"\ntoken_url = "https://auth.example.com/t"\nclient_id = "me"\n'
    )
    code, out, _ = await run_cli("config", "show", "-c", str(path))
    assert code == 0
    shown = tomllib.loads(out)
    assert shown["token"]["client_secret"] == ""
    assert parse_config(shown, {}) == load_config(path, env={})


async def test_config_help_show_bad_config_exits_2_naming_each_key(tmp_path: Path) -> None:
    """A bad config makes `config show` exit 2 with the usual one line per problem, and print nothing."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[upstream]\nurl = "api.example.com"\n[token]\ngrant = "static"\naccess_token = "x"\n[queue]\nmax_wait = 3\n'
    )
    code, out, err = await run_cli("config", "show", "-c", str(path))
    assert (code, out) == (2, "")
    assert err == (
        "config: queue.max_wait: unknown key; did you mean max_waiting?\n"
        "config: upstream.url: must be an http(s) URL, got 'api.example.com'\n"
    )


@pytest.mark.parametrize("command", [(), ("run",), ("check",), ("token",), ("config",), ("config", "show")])
async def test_config_help_help_names_the_search_path_and_the_example(command: tuple[str, ...]) -> None:
    """`--help` of tokenproxy and of each command reading a config says where it is looked for and names `config example`."""
    code, out, err = await run_cli(*command, "--help")
    assert (code, err) == (0, "")
    assert (
        "The config file is looked for at: -c FILE, else $TOKENPROXY_CONFIG, else ./tokenproxy.toml "
        "(in the current directory). `tokenproxy config example` prints every key, commented, with its default."
    ) in " ".join(out.split())  # as read, whatever the wrapping
