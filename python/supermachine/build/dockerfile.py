"""The Dockerfile front end of ``supermachine build``: instructions, stages and shell-word processing.

:func:`parse` turns Dockerfile text into :class:`Stage` objects holding :class:`Instruction` objects
and performs no variable substitution: the builder knows the build arguments and the environment
of each step and expands later with :func:`expand`, :func:`words`, :func:`key_values` and
:func:`arg_declarations`. These mirror BuildKit's ``shell`` lexer (``frontend/dockerfile/shell``)
and line parsers, so a Dockerfile means here what it means to ``docker build``.

The ``dockerfile-parse`` library splits the text into instructions (comments, line continuations
and the ``# escape=`` directive). Where it differs from BuildKit the text is adjusted before it
reads it, keeping every line where it was so line numbers stay right: parser directives are found
here (it knows only ``escape`` and ``syntax``), blank lines inside a continuation do not end the
instruction, a doubled escape character at the end of a line is not a continuation, and an
instruction continued up to the end of the file is kept.

Every error is a :class:`DockerfileError` with a one-line message that starts with where it is.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]

from supermachine.errors import InputError

__all__ = [
    "Dockerfile",
    "DockerfileError",
    "Instruction",
    "Stage",
    "arg_declarations",
    "exec_form",
    "expand",
    "key_values",
    "parse",
    "words",
]

SUPPORTED_INSTRUCTIONS = frozenset(
    {
        "FROM",
        "RUN",
        "CMD",
        "ENTRYPOINT",
        "SHELL",
        "COPY",
        "ADD",
        "ENV",
        "ARG",
        "WORKDIR",
        "USER",
        "EXPOSE",
        "LABEL",
        "VOLUME",
        "STOPSIGNAL",
        "HEALTHCHECK",
        "MAINTAINER",
    }
)

# Instructions whose arguments BuildKit reads as a JSON array when they look like one; an array
# holding anything but strings is an error there rather than a shell-form command.
_JSON_INSTRUCTIONS = frozenset({"RUN", "CMD", "ENTRYPOINT", "SHELL", "COPY", "ADD", "VOLUME"})
_HEREDOC_INSTRUCTIONS = frozenset({"RUN", "COPY", "ADD"})

# BuildKit's parser directive grammar, and the directives it knows: any other `# key=value` comment
# ends the directive block like an ordinary comment does.
_DIRECTIVE = re.compile(r"([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$")
_KNOWN_DIRECTIVES = frozenset({"syntax", "escape", "check"})
_STAGE_NAME = re.compile(r"[a-z][a-z0-9_.-]*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# BuildKit's reWhitespace: how FROM arguments and the legacy `ENV KEY value` form are split.
_WHITESPACE = re.compile(r"[\t\v\f\r ]+")
# A heredoc word as BuildKit recognises it: optional file descriptor, `<<` or `<<-`, a terminator.
_HEREDOC = re.compile(r"[0-9]*<<-?[ \t]*([^<]+)")
# The shell's special parameters: `$$`, `$@`, ... name a variable that is never set in a build.
_SPECIAL_PARAMETERS = frozenset("@*#?-$!0")


class DockerfileError(InputError):
    """A Dockerfile is malformed or uses something unsupported. One line: '<path>:<line>: <message>'."""


@dataclass(frozen=True)
class Instruction:
    """One instruction as written: keyword, flags and unsubstituted arguments."""

    name: str
    args: str
    line: int
    where: str
    # Excluded from the hash: a mapping is not hashable, and name, args and line identify it anyway.
    flags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def error(self, message: str) -> DockerfileError:
        """An error about this instruction: ``<where>: <NAME>: <message>``."""
        return DockerfileError(f"{self.where}: {self.name}: {message}")


@dataclass(frozen=True)
class Stage:
    """A build stage: its FROM and the instructions up to the next FROM."""

    index: int
    name: str | None
    base: str
    platform: str | None
    from_instruction: Instruction
    instructions: tuple[Instruction, ...]


@dataclass(frozen=True)
class Dockerfile:
    """A parsed Dockerfile."""

    path: str
    escape: str
    global_args: tuple[Instruction, ...]
    stages: tuple[Stage, ...]

    def stage_index(self, target: str | None) -> int:
        """The stage to build: the last one for None, else the one named (or numbered) ``target``."""
        if target is None:
            return len(self.stages) - 1
        wanted = target.lower()
        for stage in self.stages:
            if stage.name == wanted:
                return stage.index
        if re.fullmatch(r"[0-9]+", target) and int(target) < len(self.stages):
            return int(target)
        known = ", ".join(stage.name or str(stage.index) for stage in self.stages)
        raise DockerfileError(f"{self.path}: no build stage named {target!r} (stages: {known})")


# --- parsing -----------------------------------------------------------------------------------


def parse(text: str, path: str = "Dockerfile") -> Dockerfile:
    """Split Dockerfile ``text`` into global ARGs and stages, substituting nothing.

    ``path`` only names the file in messages.
    """
    # BuildKit drops a UTF-8 byte order mark in front of the first line.
    text = text.removeprefix("\ufeff")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the text ended with a newline: no line after it
    escape, directives = _directives(lines, path)
    sentinel = _sentinel(text)
    entries = _split_instructions(_prepare(lines, escape, directives, sentinel), path)

    global_args: list[Instruction] = []
    stages: list[Stage] = []
    current: tuple[Instruction, str | None, str, str | None] | None = None
    body: list[Instruction] = []
    first_line_of_stage: dict[str, int] = {}

    def close_stage() -> None:
        if current is not None:
            from_instruction, name, base, platform = current
            stages.append(Stage(len(stages), name, base, platform, from_instruction, tuple(body)))

    for keyword, value, start, end in entries:
        keyword = keyword.replace(sentinel, "")
        value = value.replace(sentinel, "")
        first_line = lines[start].strip()
        if end > start and len(first_line.split()) == 1 and first_line.endswith(escape):
            # `RUN\` on a line of its own: BuildKit strips the continuation before it looks for
            # the keyword; dockerfile-parse took the escape character as part of the keyword.
            keyword = first_line[:-1]
            if not keyword:
                keyword, value = [*value.split(maxsplit=1), "", ""][:2]
        instruction = _instruction(keyword.upper(), value, start + 1, path, escape)
        if instruction.name == "FROM":
            close_stage()
            name, base, platform = _stage_of(instruction)
            if name is not None:
                if name in first_line_of_stage:
                    first = first_line_of_stage[name]
                    raise instruction.error(
                        f"duplicate build stage name {name!r} (first used at line {first})"
                    )
                first_line_of_stage[name] = instruction.line
            current = (instruction, name, base, platform)
            body = []
        elif current is not None:
            body.append(instruction)
        elif instruction.name == "ARG":
            global_args.append(instruction)
        else:
            raise DockerfileError(f"{instruction.where}: {instruction.name} before the first FROM")
    close_stage()

    if not stages:
        if not global_args:
            raise DockerfileError(f"{path}: the file has no instructions")
        raise DockerfileError(f"{path}: no FROM instruction (a Dockerfile needs at least one build stage)")
    return Dockerfile(path, escape, tuple(global_args), tuple(stages))


def _directives(lines: list[str], path: str) -> tuple[str, dict[int, str]]:
    """The escape character and the parser directive lines (index -> directive name)."""
    escape = "\\"
    found: dict[int, str] = {}
    for index, line in enumerate(lines):
        stripped = line.rstrip("\r").lstrip()
        if not stripped.startswith("#"):
            break
        match = _DIRECTIVE.match(stripped[1:].lstrip())
        if match is None or match.group(1).lower() not in _KNOWN_DIRECTIVES:
            break
        name = match.group(1).lower()
        if name in found.values():
            raise DockerfileError(f"{path}:{index + 1}: only one {name} parser directive can be used")
        if name == "escape":
            if match.group(2) not in ("\\", "`"):
                raise DockerfileError(
                    f"{path}:{index + 1}: invalid escape character {match.group(2)!r} (use \\ or `)"
                )
            escape = match.group(2)
        found[index] = name
    return escape, found


def _sentinel(text: str) -> str:
    """A character that does not occur in ``text`` (private use area)."""
    for code in range(0xE000, 0xF900):
        if chr(code) not in text:
            return chr(code)
    raise DockerfileError("the Dockerfile uses every private-use character")  # pragma: no cover


def _prepare(lines: list[str], escape: str, directives: dict[int, str], sentinel: str) -> str:
    """The text as dockerfile-parse must see it to split it the way BuildKit does, line for line."""
    esc = re.escape(escape)
    # dockerfile-parse continues a line on any trailing escape character; BuildKit not when the
    # escape character is itself escaped (`echo \\`).
    library_continues = re.compile(esc + r"\s*$")
    buildkit_continues = re.compile(rf"(?:^|[^{esc}]){esc}[ \t]*$")
    prepared: list[str] = []
    for index, line in enumerate(lines):
        content = line.rstrip("\r")
        if index in directives:
            # Normalised to the two directives dockerfile-parse knows, so that it takes the escape
            # character from the block whatever other directives (`# check=`) come before it.
            prepared.append(f"# escape={escape}" if directives[index] == "escape" else "# syntax=-")
        elif not content.strip():
            # BuildKit skips blank lines inside a continuation; dockerfile-parse would end the
            # instruction there. A comment line is skipped by both, and a blank line is one anyway.
            prepared.append("#")
        elif content.lstrip().startswith("#"):
            # Comments are of no use here; emptied, none can look like a directive to dockerfile-parse
            # (it takes `# syntax=` with no value for one, BuildKit does not).
            prepared.append("#")
        elif library_continues.search(line) and not buildkit_continues.search(content):
            # Anything after the escape character stops dockerfile-parse continuing the line; the
            # sentinel is removed from what it returns.
            prepared.append(content + sentinel + line[len(content) :])
        else:
            prepared.append(line)
    # A trailing empty line ends an instruction still continued at the end of the file, which
    # dockerfile-parse would otherwise drop (BuildKit keeps it).
    return "\n".join(prepared) + "\n\n"


def _split_instructions(text: str, path: str) -> list[tuple[str, str, int, int]]:
    """(keyword, value, first line, last line) of each instruction, lines 0-based, in file order."""
    # A file object keeps dockerfile-parse from reading or writing a Dockerfile on disk.
    parser = DockerfileParser(fileobj=io.BytesIO(), env_replace=False)
    try:
        parser.content = text
    except UnicodeError as error:
        raise DockerfileError(f"{path}: not valid UTF-8 text ({error})") from None
    structure: list[dict[str, Any]] = parser.structure
    entries = [
        (str(item["instruction"]), str(item["value"]), int(item["startline"]), int(item["endline"]))
        for item in structure
        if item["instruction"] != "COMMENT"
    ]
    entries.sort(key=lambda entry: entry[2])
    return entries


def _instruction(name: str, value: str, line: int, path: str, escape: str) -> Instruction:
    where = f"{path}:{line}"
    if name == "ONBUILD":
        raise DockerfileError(f"{where}: ONBUILD is not supported")
    if name not in SUPPORTED_INSTRUCTIONS:
        raise DockerfileError(f"{where}: unknown instruction {name}")
    rest, flag_words = _split_flags(value, escape)
    args = rest.strip()
    flags: dict[str, str] = {}
    for word in flag_words:
        flag, _, flag_value = word[2:].partition("=")
        if not flag:
            raise DockerfileError(f"{where}: {name}: invalid flag {word!r}")
        if flag in flags:
            # Instruction.flags holds one value a flag; BuildKit allows repeating a few (--mount).
            raise DockerfileError(f"{where}: {name}: flag --{flag} given more than once")
        flags[flag] = flag_value
    instruction = Instruction(name, args, line, where, MappingProxyType(flags))
    if name in _HEREDOC_INSTRUCTIONS and exec_form(args) is None and _has_heredoc(args):
        raise instruction.error("heredocs are not supported")
    if name in _JSON_INSTRUCTIONS or name == "HEALTHCHECK":
        # HEALTHCHECK's command follows its type word (`HEALTHCHECK CMD ["curl", ...]`).
        json_part = _WHITESPACE.split(args, maxsplit=1)[-1] if name == "HEALTHCHECK" else args
        array = _json_array(json_part)
        if array is not None and not all(isinstance(item, str) for item in array):
            raise instruction.error("a JSON array (exec form) must hold strings only")
    return instruction


def _split_flags(text: str, escape: str) -> tuple[str, list[str]]:
    """Leading ``--flag[=value]`` words (quotes and escapes removed) and the text after them.

    Mirrors BuildKit's extractBuilderFlags: a lone ``--`` ends the flags and is dropped.
    """
    found: list[str] = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if not text.startswith("--", pos):
            return text[pos:], found
        chars: list[str] = []
        quote = ""
        while pos < end:
            char = text[pos]
            if quote:
                pos += 1
                if char == quote:
                    quote = ""
                    continue
                if char == escape:
                    if pos == end:
                        break
                    char = text[pos]
                    pos += 1
                chars.append(char)
                continue
            if char.isspace():
                break
            pos += 1
            if char in "'\"":
                quote = char
                continue
            if char == escape:
                if pos == end:
                    break
                char = text[pos]
                pos += 1
            chars.append(char)
        word = "".join(chars)
        if word == "--":
            return text[pos:], found
        found.append(word)


def _stage_of(instruction: Instruction) -> tuple[str | None, str, str | None]:
    """(name, base, platform) of a FROM instruction."""
    parts = _WHITESPACE.split(instruction.args) if instruction.args else []
    if len(parts) == 1:
        name = None
    elif len(parts) == 3 and parts[1].lower() == "as":
        name = parts[2].lower()
        if not _STAGE_NAME.fullmatch(name):
            raise instruction.error(
                f"invalid build stage name {parts[2]!r} (it must start with a letter and hold only "
                "letters, digits, '-', '_' and '.')"
            )
    else:
        raise instruction.error(
            f"expected 'FROM [--platform=PLATFORM] IMAGE [AS NAME]', got {instruction.args!r}"
        )
    return name, parts[0], instruction.flags.get("platform") or None


def _has_heredoc(args: str) -> bool:
    """Whether shell-form ``args`` hold a heredoc word (``<<EOF``, ``<<-'EOF'``, ``2<< EOF``...)."""
    if "<<" not in args:
        return False
    # BuildKit's lexer keeps blanks after `<<` in the heredoc word (`cat << EOF`); quotes stay in
    # the words here, so a quoted `<<` never starts one.
    joined = re.sub(r"<<[ \t]+", "<<", args)
    for word in _raw_words(joined, "\\"):
        match = _HEREDOC.fullmatch(word)
        if match and match.group(1).replace('"', "").replace("'", "").strip():
            return True
    return False


def _json_array(text: str) -> list[Any] | None:
    text = text.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, list) else None


def exec_form(text: str) -> list[str] | None:
    """The exec-form argument list if ``text`` is a JSON array of strings, else None (shell form).

    Text that starts with ``[`` but is not valid JSON is shell form, as Docker treats it.
    """
    array = _json_array(text)
    if array is None or not all(isinstance(item, str) for item in array):
        return None
    return [str(item) for item in array]


# --- shell-word processing -----------------------------------------------------------------------


def expand(text: str, env: Mapping[str, str], where: str, escape: str = "\\") -> str:
    """Substitute variables and remove quotes and escapes, keeping whitespace (one word)."""
    return _process(text, env, where, escape)[0]


def words(text: str, env: Mapping[str, str], where: str, escape: str = "\\") -> list[str]:
    """Like :func:`expand`, split into words at unquoted whitespace (also inside substitutions)."""
    return _process(text, env, where, escape)[1]


def key_values(text: str, env: Mapping[str, str], where: str, escape: str = "\\") -> list[tuple[str, str]]:
    """The pairs of ENV or LABEL arguments: ``K=V K2="v 2"`` or the legacy ``K value with spaces``."""
    raw = _raw_words(text, escape)
    if not raw:
        raise DockerfileError(f"{where}: expected KEY=VALUE arguments")
    if "=" not in raw[0]:
        parts = _WHITESPACE.split(text.strip(), maxsplit=1)
        if len(parts) < 2:
            raise DockerfileError(f"{where}: {parts[0]!r} has no value (expected KEY=VALUE or KEY VALUE)")
        key = expand(parts[0], env, where, escape)
        if not key:
            raise DockerfileError(f"{where}: empty key in {parts[0]!r}")
        return [(key, expand(parts[1], env, where, escape))]
    pairs: list[tuple[str, str]] = []
    for word in raw:
        raw_key, equals, raw_value = word.partition("=")
        key = expand(raw_key, env, where, escape) if equals else ""
        if not key:
            raise DockerfileError(f"{where}: expected KEY=VALUE, got {word!r}")
        pairs.append((key, expand(raw_value, env, where, escape)))
    return pairs


def arg_declarations(
    text: str, env: Mapping[str, str], where: str, escape: str = "\\"
) -> list[tuple[str, str | None]]:
    """The ``name`` or ``name=default`` words of an ARG, defaults expanded; None means no default."""
    raw = _raw_words(text, escape)
    if not raw:
        raise DockerfileError(f"{where}: expected NAME or NAME=DEFAULT arguments")
    declarations: list[tuple[str, str | None]] = []
    for word in raw:
        name, equals, default = word.partition("=")
        if not _IDENTIFIER.fullmatch(name):
            raise DockerfileError(f"{where}: invalid ARG name {name!r} in {word!r}")
        declarations.append((name, expand(default, env, where, escape) if equals else None))
    return declarations


def _raw_words(text: str, escape: str) -> list[str]:
    """Split at unquoted, unescaped whitespace, keeping quotes and escapes (BuildKit's parseWords)."""
    found: list[str] = []
    chars: list[str] = []
    quote = ""
    pos, end = 0, len(text)
    while pos < end:
        char = text[pos]
        pos += 1
        if quote:
            if char == quote:
                quote = ""
            elif char == escape and quote != "'":
                if pos == end:
                    break  # an escape character at the very end is dropped
                chars.append(char)
                char = text[pos]
                pos += 1
            chars.append(char)
        elif char.isspace():
            if chars:
                found.append("".join(chars))
                chars = []
        else:
            if char in "'\"":
                quote = char
            elif char == escape:
                if pos == end:
                    break
                chars.append(char)
                char = text[pos]
                pos += 1
            chars.append(char)
    if chars:
        found.append("".join(chars))
    return found


class _LexError(Exception):
    """A syntax error found while processing a word (the caller adds where it is)."""


class _Words:
    """Collects words: unquoted whitespace ends one, quoted or escaped text always belongs to one."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.chars: list[str] = []
        self.started = False

    def add(self, text: str) -> None:
        """Unquoted text, literal or substituted: its whitespace separates words."""
        for char in text:
            if char.isspace():
                self.end()
            else:
                self.chars.append(char)
                self.started = True

    def add_quoted(self, text: str) -> None:
        # Even an empty quoted string makes a word, as in a shell.
        self.chars.append(text)
        self.started = True

    def end(self) -> None:
        if self.started:
            self.done.append("".join(self.chars))
            self.chars = []
            self.started = False


class _Lexer:
    """BuildKit's shell-word processing: quotes, escapes and ``$`` substitutions, no word splitting
    by itself (:class:`_Words` does that) and no command substitution or globbing."""

    def __init__(self, text: str, env: Mapping[str, str], escape: str) -> None:
        self.text = text
        self.pos = 0
        self.env = env
        self.escape = escape
        # Inside ${VAR#pattern}, ${VAR%pattern} and ${VAR/pattern/...} escapes are kept so that
        # the pattern can still tell an escaped `*` from a wildcard.
        self.raw_escapes = False

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def next(self) -> str:
        char = self.peek()
        self.pos += len(char)
        return char

    def process(self, stop: str, raw_escapes: bool) -> tuple[str, list[str]]:
        """Process up to ``stop`` (consumed) or, with ``stop == ""``, to the end of the text."""
        saved, self.raw_escapes = self.raw_escapes, raw_escapes
        try:
            return self._process(stop)
        finally:
            self.raw_escapes = saved

    def _process(self, stop: str) -> tuple[str, list[str]]:
        result: list[str] = []
        collected = _Words()
        while self.pos < len(self.text):
            char = self.peek()
            if stop and char == stop:
                self.pos += 1
                collected.end()
                return "".join(result), collected.done
            if char == "$":
                value = self.dollar()
                result.append(value)
                collected.add(value)
            elif char == "'":
                value = self.single_quoted()
                result.append(value)
                collected.add_quoted(value)
            elif char == '"':
                value = self.double_quoted()
                result.append(value)
                collected.add_quoted(value)
            else:
                self.pos += 1
                if char == self.escape:
                    if self.raw_escapes:
                        collected.add_quoted(char)
                        result.append(char)
                    if self.pos == len(self.text):
                        break  # an escape character at the very end escapes nothing and is dropped
                    char = self.next()
                    collected.add_quoted(char)
                else:
                    collected.add(char)
                result.append(char)
        if stop:
            raise _LexError(f"missing {stop!r}")
        collected.end()
        return "".join(result), collected.done

    def single_quoted(self) -> str:
        # Everything up to the next single quote is literal; nothing escapes a single quote.
        self.pos += 1
        close = self.text.find("'", self.pos)
        if close < 0:
            raise _LexError("unterminated single quote")
        value = self.text[self.pos : close]
        self.pos = close + 1
        return value

    def double_quoted(self) -> str:
        self.pos += 1
        result: list[str] = []
        while True:
            char = self.peek()
            if not char:
                raise _LexError("unterminated double quote")
            if char == '"':
                self.pos += 1
                return "".join(result)
            if char == "$":
                result.append(self.dollar())
                continue
            self.pos += 1
            if char == self.escape:
                if self.raw_escapes:
                    result.append(char)
                # Inside double quotes the escape character only escapes `"`, `$` and itself;
                # before anything else it is an ordinary character (BuildKit, like sh).
                if self.peek() in ('"', "$", self.escape):
                    char = self.next()
                elif not self.peek():
                    continue
            result.append(char)

    def name(self) -> str:
        """A variable name after ``$``: digits, one special parameter, or letters, digits and ``_``."""
        start = self.pos
        char = self.peek()
        if char.isdecimal():
            while self.peek().isdecimal():
                self.pos += 1
            return self.text[start : self.pos]
        if char in _SPECIAL_PARAMETERS:
            self.pos += 1
            return char
        while self.peek() and (self.peek().isalpha() or self.peek().isdecimal() or self.peek() == "_"):
            self.pos += 1
        return self.text[start : self.pos]

    def lookup(self, name: str) -> tuple[str, bool]:
        if name in self.env:
            return self.env[name], True
        return "", False

    def until(self, stop: str, raw_escapes: bool, missing: str) -> str:
        try:
            return self.process(stop, raw_escapes)[0]
        except _LexError:
            if self.pos >= len(self.text):
                raise _LexError(missing) from None
            raise

    def dollar(self) -> str:
        self.pos += 1
        if self.peek() != "{":
            name = self.name()
            # A `$` not followed by a name is an ordinary character.
            return self.lookup(name)[0] if name else "$"
        self.pos += 1
        if not self.peek():
            raise _LexError("missing '}'")
        if self.peek() in "{}:":
            raise _LexError("bad substitution")
        name = self.name()
        operator = self.next()
        if operator == "}":
            return self.lookup(name)[0]
        if not operator:
            raise _LexError("missing '}'")
        colon = operator == ":"
        if colon:
            operator = self.next()
        spelled = (":" if colon else "") + operator
        if operator in ("-", "+", "?") or (operator in ("#", "%") and not colon):
            word = self.until("}", operator in ("#", "%"), "missing '}'")
            value, is_set = self.lookup(name)
            # With a colon an empty value counts as unset.
            unset = not is_set or (colon and value == "")
            if operator == "-":
                return word if unset else value
            if operator == "+":
                return "" if unset else word
            if operator == "?":
                if not is_set:
                    raise _LexError(f"{name}: {word or 'is not allowed to be unset'}")
                if unset:
                    raise _LexError(f"{name}: {word or 'is not allowed to be empty'}")
                return value
            # Doubled (`##`, `%%`) removes the longest match, single the shortest.
            greedy = word.startswith(operator)
            pattern = word[1:] if greedy else word
            if operator == "#":
                return _trim_prefix(pattern, value, greedy)
            return _trim_prefix(_reverse_pattern(pattern), value[::-1], greedy)[::-1]
        if operator == "/" and not colon:
            every = self.peek() == "/"
            if every:
                self.pos += 1
            pattern = self.until("/", True, "missing '/' in ${}")
            replacement = self.until("}", True, "missing '}'")
            value = self.lookup(name)[0]
            regex = _pattern_regex(pattern, greedy=True, anchored=False)
            return regex.sub(lambda _: replacement, value, count=0 if every else 1)
        if not operator:
            raise _LexError("missing '}'")
        raise _LexError(f"unsupported modifier ({spelled}) in substitution")


def _pattern_regex(pattern: str, greedy: bool, anchored: bool) -> re.Pattern[str]:
    """A shell wildcard pattern (``*``, ``?``, backslash escapes; no brackets) as a regex."""
    parts = ["^"] if anchored else []
    pos = 0
    while pos < len(pattern):
        char = pattern[pos]
        pos += 1
        if char == "*":
            parts.append(".*" if greedy else ".*?")
        elif char == "?":
            parts.append(".")
        elif char == "\\":
            following = pattern[pos : pos + 1]
            if following in ("}", "/"):
                continue  # escaped only to get past the ${...} syntax; the character is literal
            if following not in ("*", "?", "\\"):
                raise _LexError(f"invalid escape in pattern {pattern!r}")
            parts.append(re.escape(following))
            pos += 1
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts))


def _trim_prefix(pattern: str, value: str, greedy: bool) -> str:
    match = _pattern_regex(pattern, greedy, anchored=True).match(value)
    return value[match.end() :] if match else value


def _reverse_pattern(pattern: str) -> str:
    """``pattern`` reversed with its escape pairs kept in order, to match a reversed value.

    A suffix match is a prefix match on the reversed text (the shortest suffix is hard to find
    with a regex that searches left to right).
    """
    tokens: list[str] = []
    pos = 0
    while pos < len(pattern):
        size = 2 if pattern[pos] == "\\" and pos + 1 < len(pattern) else 1
        tokens.append(pattern[pos : pos + size])
        pos += size
    return "".join(reversed(tokens))


def _process(text: str, env: Mapping[str, str], where: str, escape: str) -> tuple[str, list[str]]:
    try:
        return _Lexer(text, env, escape).process("", False)
    except _LexError as error:
        message = str(error).replace("\r", "\\r").replace("\n", "\\n")
        raise DockerfileError(f"{where}: {message} in {text!r}") from None
