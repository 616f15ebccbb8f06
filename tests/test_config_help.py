"""Help with the config: did-you-mean for unknown keys and sections, `config example`, `config show`, `--help`."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_cli


async def test_config_help_misspelt_key_exits_2_suggesting_the_key(tmp_path: Path) -> None:
    """A misspelt key in [token] is named with the key it was likely meant to be."""
    path = tmp_path / "c.toml"
    path.write_text('[upstream]\nurl = "https://api.example.com"\n[token]\ngrant = "static"\naccess_token = "x"\nclientid = "a"\n')
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, out, err) == (2, "", "config: token.clientid: unknown key; did you mean client_id?\n")


async def test_config_help_misspelt_section_exits_2_calling_it_a_section(tmp_path: Path) -> None:
    """A misspelt section header is called a section and given the section it was likely meant to be."""
    path = tmp_path / "c.toml"
    path.write_text('[upstream]\nurl = "https://api.example.com"\n[token]\ngrant = "static"\naccess_token = "x"\n[tokne]\nscope = "a"\n')
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, out, err) == (2, "", "config: [tokne]: unknown section; did you mean [token]?\n")


async def test_config_help_misspelt_subsection_exits_2_naming_it_dotted(tmp_path: Path) -> None:
    """A misspelt table inside a section is named by its dotted header, with the one it was likely meant to be."""
    path = tmp_path / "c.toml"
    path.write_text('[upstream]\nurl = "https://api.example.com"\n[token]\ngrant = "static"\naccess_token = "x"\n[token.jsno]\nurl = ""\n')
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, out, err) == (2, "", "config: [token.jsno]: unknown section; did you mean [token.json]?\n")


async def test_config_help_unknown_key_nothing_close_has_no_suggestion(tmp_path: Path) -> None:
    """An unknown key like no valid one gets no guess, and an unknown section none either."""
    path = tmp_path / "c.toml"
    path.write_text('[upstream]\nurl = "https://api.example.com"\nzzz = 1\n[token]\ngrant = "static"\naccess_token = "x"\n[qqq]\n')
    code, out, err = await run_cli("check", "-c", str(path))
    assert (code, out, err) == (2, "", "config: [qqq]: unknown section\nconfig: upstream.zzz: unknown key\n")
