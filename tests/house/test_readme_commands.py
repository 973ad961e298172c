"""Every ``tidal ...`` command the README gives exists, with the options it shows.

Commands come from the README's ``sh`` code blocks and from inline code spans that start with
``tidal ``. Each is walked through the CLI's click tree: every word up to the first argument
must be a command or subcommand, every ``--option`` must belong to that command, and
``tidal <command> --help`` must run.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.testing

from tidal.cli.main import app

README = Path(__file__).resolve().parents[2] / "README.md"
_ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*$")


def _snippets(text: str) -> list[str]:
    """Shell text of the README: ``sh`` blocks (continuations joined) and inline spans."""
    found = []
    for block in re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", text, re.S | re.M):
        found += block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found += [span for span in re.findall(r"`([^`\n]+)`", prose) if span.startswith("tidal ")]
    return found


def readme_commands(text: str) -> list[list[str]]:
    """Each ``tidal`` invocation as its words, without comments, brackets or redirections."""
    commands = []
    for line in _snippets(text):
        line = line.split(" #", 1)[0].replace("[", " ").replace("]", " ")
        line = re.sub(r"(?<=\w)\|(?=\w)", ",", line)  # `restore|adopt`: one argument, not a pipe
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        part: list[str] = []
        for word in [*lexer, ";"]:
            if word not in {";", "|", "||", "&&", "&"}:
                part.append(word)
                continue
            while part and _ENV_ASSIGNMENT.match(part[0]):
                part = part[1:]
            if part[:1] == ["tidal"]:
                for stop in (">", ">>", "--"):
                    if stop in part:
                        part = part[: part.index(stop)]
                commands += _alternatives(part[1:])
            part = []
    return commands


def _alternatives(words: list[str]) -> list[list[str]]:
    """``image push/pull/mount`` (prose shorthand) as three commands; paths stay as they are."""
    for i, word in enumerate(words[:2]):
        if re.fullmatch(r"[a-z-]+(?:/[a-z-]+)+", word):
            return [[*words[:i], alt, *words[i + 1 :]] for alt in word.split("/")]
    return [words]


def _options(command: Any) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(param.opts)
        names.update(param.secondary_opts)
    return names


def resolve(words: list[str]) -> tuple[list[str], list[str]]:
    """(command path, problems) of one README invocation in the CLI's click tree."""
    command: Any = typer.main.get_command(app)  # typer's own click tree (typer._click)
    path: list[str] = []
    rest = list(words)
    while hasattr(command, "commands"):  # a group
        if rest == ["--help"]:
            return path, []
        if not rest or rest[0].startswith("-"):
            return path, [f"`tidal {' '.join(path)}` names a group, not a command"]
        sub = command.commands.get(rest[0])
        if sub is None:
            return path, [f"`tidal {' '.join(path)}` has no command {rest[0]!r}"]
        command = sub
        path.append(rest.pop(0))
    known = _options(command)
    problems = [
        f"`tidal {' '.join(path)}` has no option {flag}"
        for flag in (w.split("=", 1)[0] for w in rest if w.startswith("-") and w != "-")
        if (flag.startswith("--") or len(flag) == 2) and flag not in known
    ]
    return path, problems


COMMANDS = readme_commands(README.read_text())


def test_the_readme_gives_commands_of_every_group() -> None:
    firsts = {c[0] for c in COMMANDS if c}
    assert {"image", "qos", "sched", "p2p", "run", "ps", "daemon", "demo"} <= firsts, firsts
    assert len(COMMANDS) > 40


def test_every_readme_command_exists_with_its_options() -> None:
    problems = [p for words in COMMANDS for p in resolve(words)[1]]
    assert problems == []


@pytest.mark.parametrize(
    "path",
    sorted({tuple(resolve(words)[0]) for words in COMMANDS}),
    ids=" ".join,
)
def test_readme_command_help_runs(path: tuple[str, ...]) -> None:
    result = typer.testing.CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_resolve_finds_wrong_commands_and_options() -> None:
    """The checker itself: it must catch a renamed command and an unknown option."""
    assert resolve(["image", "mount", "/a", "/b", "--rw"]) == (["image", "mount"], [])
    assert resolve(["image", "mnt", "/a"])[1] == ["`tidal image` has no command 'mnt'"]
    assert resolve(["ps", "--all-of-them"])[1] == ["`tidal ps` has no option --all-of-them"]
    assert resolve(["qos"])[1] == ["`tidal qos` names a group, not a command"]
    assert readme_commands("```sh\nX=1 tidal ps -a; tidal logs -f web  # c\n```\n") == [
        ["ps", "-a"],
        ["logs", "-f", "web"],
    ]
    assert readme_commands("`tidal run IMG -- sh -c 'a; b' > out`") == [["run", "IMG"]]
    assert readme_commands("`tidal image push/pull`") == [["image", "push"], ["image", "pull"]]
