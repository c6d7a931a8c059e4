"""README.md's command lines parse with the CLIs they name: a flag renamed or removed in code fails here, not for users.

Every `python -m model|training|export|service|bench ...` (`service doctor` too), `convnext <command> ...` and
`torchrun ... -m training ...` in README.md (fenced and indented code blocks, inline code) is parsed by the
`get_args_parser()` of the module it runs, routed as convnext_cli, service and bench route it; nothing is run.
`make` and `docker` lines are left out, and so are shell comments (prose, though they may quote a command) and a
list of modules (`python -m model|training`).

A synopsis is checked in every form it allows: its optional `[...]` parts left out, and all taken with the first, then
the second, ... choice of each `a|b` (`[--engine onnxruntime|tensorrt]`). Its placeholders are values: `N` is 1, `PX`
224, any other (`PATH`, `NAME`, `<convnext_tiny repository>`) itself; `KEY ...` repeats the value before it.
A command that elides its arguments (`python -m bench soak ...`) is checked up to its `...`, as a reference; a
placeholder where the parser needs one of its choices (`python -m model download NAME`) takes the first it names.
Inline code that names a command or a flag in a sentence (`python -m export onnx`, `convnext serve --checkpoint`) is
a reference, not a command line: its subcommands, flags and values must exist, but what it leaves out may be required.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import itertools
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import convnext_cli
import service.__main__ as service_main
from bench.__main__ import DELEGATED_HELP

README = Path(__file__).resolve().parents[1] / "README.md"
COMMAND_START = re.compile(
    r"\btorchrun\s[^`#]*?-m\s+training(?=\s|$)"
    r"|\bpython3? -m (?:model|training|export|service|bench|convnext_cli)(?=\s|$)"
    r"|(?<![\w/.-])convnext (?:" + "|".join(convnext_cli.COMMANDS) + r")(?=\s|$)")
# Where a shell command ends: a comment, `&&`, `||`, `;`, a redirect (`>`, `2>`), a pipe (a spaced `|` not followed by
# a flag: `--pretrained NAME | --checkpoint PATH` is a choice), and a backtick (a span inside a ``double`` span).
COMMAND_END = re.compile(r"(?:^|\s)#|&&|\|\||;|(?:^|\s)\d?>|\s\|\s+(?!-)|`")
ANGLE_PLACEHOLDER = re.compile(r"<[A-Za-z][^<>]*>")
# The README's placeholders, and any <...>; another upper-case word (LATENCY) is a value like any other.
PLACEHOLDER = re.compile(r"^(?:ARCHITECTURE|DIR|FILE|KEY|MODEL\.TAG|N|NAME|PATH|PX|R|TEXT|URL|<[^<>]+>)$")
SAMPLE_VALUES = {"N": "1", "PX": "224"}  # the numeric placeholders, as a number their flags take
# bench/__main__.py hands these subcommands to their own module's parser.
BENCH_DELEGATED = {"torch": "bench.model_throughput", "roadmap": "bench.roadmap", "serve": "bench.serve_benchmark",
                   "cpu": "bench.cpu_engines", "cpu-serving": "bench.cpu_serving", "soak": "bench.soak"}
FILES_THE_README_ASSUMES = ("model.onnx",)  # `bench engine model.onnx`: its parser checks that the file exists


@dataclass(frozen=True)
class ReadmeCommand:
    line: int
    text: str
    inline: bool  # inline code in a sentence (may be a reference), or a code block's command line


def _code_lines(lines: list[str]) -> list[tuple[int, str]]:
    """The lines of fenced and indented code blocks, each with its line number; the rest is prose."""
    code, fenced, indented, previous_blank = [], False, False, True
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            fenced, previous_blank = not fenced, False
        elif fenced or (line.startswith("    ") and (previous_blank or indented)):
            indented = not fenced
            code.append((number, line))
        else:
            indented, previous_blank = False, not line.strip()
    return code


def _logical_lines(code: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Code lines joined where a command goes on: after a trailing backslash, or a synopsis wrapped onto a `[` line."""
    joined: list[tuple[int, str]] = []
    for number, line in code:
        if joined and (joined[-1][1].endswith("\\") or line.lstrip().startswith("[")):
            joined[-1] = (joined[-1][0], joined[-1][1].removesuffix("\\").rstrip() + " " + line.strip())
        else:
            joined.append((number, line.rstrip()))
    return joined


def _inline_spans(lines: list[str], code_line_numbers: set[int]) -> list[tuple[int, str]]:
    """Inline code of each paragraph (a span may cross a line break), with the line it starts on."""
    spans, paragraph = [], []
    for number, line in [*enumerate(lines, 1), (len(lines) + 1, "")]:
        if line.strip() and number not in code_line_numbers and not line.startswith("```"):
            paragraph.append((number, line))
            continue
        text = "\n".join(text for _, text in paragraph)
        for match in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, re.S):
            line_number = paragraph[0][0] + text.count("\n", 0, match.start())
            spans.append((line_number, match.group(2).replace("\n", " ")))
        paragraph = []
    return spans


def _commands_in(text: str) -> list[str]:
    """Each command in a piece of code: from where it starts to the first shell operator (or the next command)."""
    text = ANGLE_PLACEHOLDER.sub(lambda m: m.group(0).replace(" ", "_"), text)  # one word, and no redirect
    starts = [match.start() for match in COMMAND_START.finditer(text)]
    commands = []
    for start, next_start in zip(starts, [*starts[1:], len(text)][:len(starts)], strict=True):
        command = text[start:next_start]
        end = COMMAND_END.search(command)
        commands.append((command[:end.start()] if end else command).strip())
    return commands


def extract_commands(readme: str) -> list[ReadmeCommand]:
    lines = readme.splitlines()
    code = _code_lines(lines)
    found = [ReadmeCommand(number, command, inline=False)
             for number, line in _logical_lines(code)
             for command in _commands_in(re.split(r"(?:^|\s)#", line, maxsplit=1)[0])]
    found += [ReadmeCommand(number, command, inline=True)
              for number, span in _inline_spans(lines, {number for number, _ in code})
              for command in _commands_in(span)]
    return sorted(found, key=lambda command: command.line)


def elided_from(tokens: list[str]) -> int | None:
    """Where a command elides its arguments (`python -m bench soak ...`): the index of its `...`, or None. Its words
    before that are checked as a reference is. (`KEY ...` is KEY repeated, not an elision.)"""
    for index, (before, token) in enumerate(zip(["", *tokens[:-1]], tokens, strict=True)):
        if "..." in token.strip("[]") and not (token.strip("[]") == "..." and PLACEHOLDER.match(before.strip("[]"))):
            return index
    return None


@dataclass
class Choice:
    """Alternatives (each a list of words and Choices) of which a form takes one, or none when optional."""
    alternatives: list[list]
    optional: bool


def _synopsis(tokens: list[str]) -> Choice:
    """Tokens as nested choices: `[...]` an optional one, `|` between alternatives; a `|` outside brackets chooses
    between what follows the command's words (`convnext serve --pretrained NAME | --checkpoint PATH`)."""
    stack = [Choice([[]], optional=False)]
    for token in tokens:
        word = token.lstrip("[")
        opened = len(token) - len(word)
        word, closed = word.rstrip("]"), len(word) - len(word.rstrip("]"))
        stack += [Choice([[]], optional=True) for _ in range(opened)]
        if word == "|":
            stack[-1].alternatives.append([])
        elif word and not (word == "..." and PLACEHOLDER.match(_last_word(stack[-1].alternatives[-1]))):
            stack[-1].alternatives[-1].append(word)  # `KEY ...`: the value repeated, one is enough
        for _ in range(closed):
            choice = stack.pop()
            stack[-1].alternatives[-1].append(choice)
    assert len(stack) == 1, f"unbalanced [ ] in {' '.join(tokens)}"
    top = stack[0]
    first = top.alternatives[0]
    words = len(first) - len(list(itertools.dropwhile(lambda item: not str(item).startswith("-"), first)))
    return Choice([[*first[:words], Choice([first[words:], *top.alternatives[1:]], optional=False)]], optional=False)


def _last_word(items: list) -> str:
    return items[-1] if items and isinstance(items[-1], str) else ""


def _expand(choice: Choice, pick: int, with_optional: bool) -> list[str]:
    words: list[str] = []
    for item in choice.alternatives[min(pick, len(choice.alternatives) - 1)]:
        if isinstance(item, str):
            options = item.split("|")
            words.append(options[min(pick, len(options) - 1)])
        elif with_optional or not item.optional:
            words += _expand(item, pick, with_optional)
    return words


def _choice_count(choice: Choice) -> int:
    return max([len(choice.alternatives)] + [len(item.split("|")) if isinstance(item, str) else _choice_count(item)
                                             for items in choice.alternatives for item in items])


def forms(tokens: list[str]) -> list[list[str]]:
    """Every form a synopsis allows that we check: optional parts left out, then all in with each choice in turn."""
    synopsis = _synopsis(tokens)
    candidates = [_expand(synopsis, 0, with_optional=False)]
    candidates += [_expand(synopsis, choice, with_optional=True) for choice in range(_choice_count(synopsis))]
    unique = [list(form) for form in dict.fromkeys(tuple(form) for form in candidates)]
    return [[SAMPLE_VALUES.get(word, word) for word in form] for form in unique]


def route(words: list[str]) -> tuple[str, list[str]]:
    """The module whose parser reads the arguments, and those arguments, as the command runs them."""
    if words[0] == "torchrun":
        at = words.index("-m")
        module, argv = f"{words[at + 1]}.__main__", words[at + 2:]
    elif words[0] == "convnext" or words[2] == "convnext_cli":
        argv = words[1:] if words[0] == "convnext" else words[3:]
        module, argv = convnext_cli.command_module(argv), argv[1:]
    else:
        module, argv = f"{words[2]}.__main__", words[3:]
    if module == "service.__main__" and argv[:1] == ["doctor"]:
        return "service.doctor", argv[1:]
    if module == "bench.__main__" and argv[:1] and argv[0] in BENCH_DELEGATED:
        return BENCH_DELEGATED[argv[0]], argv[1:]
    return module, argv


class Refused(Exception):
    """The parser refused the arguments; the message is its error line."""


def _parse(parser: argparse.ArgumentParser, argv: list[str], known: bool = False) -> tuple[object, list[str]] | None:
    """The parsed arguments and those left over (`known`), or None for --help / --version; Refused."""
    errors = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
        try:
            return parser.parse_known_args(argv) if known else (parser.parse_args(argv), [])
        except SystemExit as exit_:
            if exit_.code in (0, None):
                return None
            raise Refused(errors.getvalue().strip().splitlines()[-1]) from None


def _nothing_required(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """For a reference: a subcommand, positional or flag it leaves out is not missing (argparse's private fields)."""
    for action in parser._actions:
        action.required = False
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _nothing_required(subparser)
    for group in parser._mutually_exclusive_groups:
        group.required = False
    return parser


def check_arguments(module: str, argv: list[str], reference: bool) -> None:
    """Refused unless the module's parser takes argv; a reference may end with a flag named without its value.

    The service's flags are its Settings: their values (an engine's name, a port) are checked there, not by argparse
    (service/__main__.py: settings_from_args), so they are checked here too."""
    parser = importlib.import_module(module).get_args_parser()
    parser = _nothing_required(parser) if reference else parser
    try:
        parsed = _parse(parser, argv, known=module == "convnext_serve")
    except Refused as refused:
        flag = re.search(r"argument ([-\w/]+): expected (?:one|at least one) argument", str(refused))
        if not (reference and flag and argv and argv[-1] in flag.group(1).split("/")):
            raise
        return check_arguments(module, argv[:-1], reference)
    if parsed is None:  # --help, --version
        return None
    args, rest = parsed
    if module == "convnext_serve":  # the flags it does not know go to the service (its main: startable_settings)
        return check_arguments("service.__main__", [*rest, "--repository", args.repository], reference)
    if module == "service.__main__":
        try:
            service_main.settings_from_args(argv)
        except ValueError as error:  # pydantic's ValidationError
            raise Refused(f"invalid settings: {service_main.settings_error(error)}") from None
    return None


def _test_id(command: ReadmeCommand) -> str:
    """Short and stable (no line number): the command's words, cut at 40 characters with a digest of the rest."""
    words = command.text.split()
    if words[0] == "torchrun":
        words = ["torchrun", *words[words.index("-m") + 1:]]
    words = words[2:] if words[:2] in (["python", "-m"], ["python3", "-m"]) else words
    slug = re.sub(r"[^\w.-]+", "-", " ".join(word.strip("[]").lstrip("-") for word in words)).strip("-")
    if len(slug) > 40:
        slug = f"{slug[:40]}~{hashlib.sha1(command.text.encode()).hexdigest()[:6]}"
    return f"inline-{slug}" if command.inline else slug


COMMANDS = extract_commands(README.read_text())
UNIQUE: dict[tuple[str, bool], ReadmeCommand] = {}  # a command written twice is checked once, at its first line
for _command in COMMANDS:
    UNIQUE.setdefault((_command.text, _command.inline), _command)


@pytest.fixture
def in_folder_with_assumed_files(tmp_path, monkeypatch):
    """The files the README's commands assume, and no CONVNEXT_* variable: the Settings read only the flags."""
    monkeypatch.chdir(tmp_path)
    for name in [name for name in os.environ if name.upper().startswith("CONVNEXT_")]:  # the Settings: any case
        monkeypatch.delenv(name)
    for name in FILES_THE_README_ASSUMES:
        (tmp_path / name).write_bytes(b"")


@pytest.mark.usefixtures("in_folder_with_assumed_files")
@pytest.mark.parametrize("command", UNIQUE.values(), ids=[_test_id(command) for command in UNIQUE.values()])
def test_readme_command_parses(command: ReadmeCommand):
    """Elided arguments (`...`): the words before them, as a reference. A placeholder where the parser needs one of
    its choices (`python -m model download NAME`): each of the parser's choices in turn would do; the first is taken."""
    where = f"README.md:{command.line}: {command.text}"
    tokens = shlex.split(command.text)
    elided = elided_from(tokens)
    reference = command.inline or elided is not None
    for words in forms(tokens[:elided]):
        module, argv = route(words)
        try:
            with_choice(module, argv, reference)
        except Refused as refused:
            pytest.fail(f"{where}\n  as {module} {' '.join(argv)}\n  {refused}", pytrace=False)


def with_choice(module: str, argv: list[str], reference: bool) -> None:
    """check_arguments, with a placeholder the parser refuses as a choice replaced by the first choice it names."""
    try:
        check_arguments(module, argv, reference)
    except Refused as refused:
        placeholder = re.search(r"invalid choice: '([^']*)' \(choose from '?([^',)]+)", str(refused))
        if not (placeholder and PLACEHOLDER.match(placeholder.group(1)) and placeholder.group(1) in argv):
            raise
        argv = [placeholder.group(2) if word == placeholder.group(1) else word for word in argv]
        check_arguments(module, argv, reference)


def test_the_extractor_finds_the_readme_commands():
    """A broken extractor cannot pass by finding nothing: every kind of command is found, in both kinds of code."""
    texts = [command.text for command in COMMANDS]
    assert len(COMMANDS) >= 75, f"only {len(COMMANDS)} commands found in README.md"
    assert sum(not command.inline for command in COMMANDS) >= 30
    for prefix in ("python -m model ", "python -m training ", "python -m export ", "python -m service doctor",
                   "python -m bench ", "convnext serve --", "convnext doctor", "torchrun --nproc_per_node 8 -m "):
        assert any(text.startswith(prefix) for text in texts), f"no {prefix!r} command found"
    assert set(BENCH_DELEGATED) == set(DELEGATED_HELP), "bench/__main__.py delegates other subcommands: update the map"
    ids = [_test_id(command) for command in UNIQUE.values()]
    assert len(set(ids)) == len(ids), "two commands share a test id (pytest would number them by README order)"
