"""The Dockerfile front end: parsing into stages, and BuildKit-compatible shell-word processing."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from supermachine.build.dockerfile import (
    Dockerfile,
    DockerfileError,
    Instruction,
    arg_declarations,
    exec_form,
    expand,
    key_values,
    parse,
    words,
)
from supermachine.errors import InputError

MULTI_STAGE = """\
# syntax=docker/dockerfile:1
# A two-stage build: compile, then copy the binary into a small image.
ARG GO_VERSION=1.22
ARG BASE

FROM --platform=$BUILDPLATFORM golang:${GO_VERSION} AS Build
WORKDIR /src
# dependencies first, for the cache
RUN apt-get update && \\
    # a comment inside a continuation is skipped
    apt-get install -y make \\

    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN make

from ${BASE:-alpine}
copy --chown=1:2 --from=build /src/app /usr/local/bin/app
CMD ["app", "--serve"]
"""


def test_parse_multi_stage() -> None:
    dockerfile = parse(MULTI_STAGE, "ctx/Dockerfile")

    assert dockerfile.path == "ctx/Dockerfile"
    assert dockerfile.escape == "\\"
    assert [(arg.name, arg.args, arg.line) for arg in dockerfile.global_args] == [
        ("ARG", "GO_VERSION=1.22", 3),
        ("ARG", "BASE", 4),
    ]
    build, final = dockerfile.stages

    assert (build.index, build.name, build.platform) == (0, "build", "$BUILDPLATFORM")
    assert build.base == "golang:${GO_VERSION}"  # not substituted: the builder expands ARGs
    assert build.from_instruction.line == 6
    assert build.from_instruction.where == "ctx/Dockerfile:6"
    assert build.from_instruction.args == "golang:${GO_VERSION} AS Build"
    assert [(i.name, i.line) for i in build.instructions] == [
        ("WORKDIR", 7),
        ("RUN", 9),
        ("COPY", 14),
        ("RUN", 15),
    ]
    # The comment and the blank line inside the continuation neither end it nor reach the text.
    assert build.instructions[1].args == (
        "apt-get update &&     apt-get install -y make     && rm -rf /var/lib/apt/lists/*"
    )

    assert (final.index, final.name, final.base, final.platform) == (1, None, "${BASE:-alpine}", None)
    copy, cmd = final.instructions
    assert (copy.name, copy.line, copy.where) == ("COPY", 18, "ctx/Dockerfile:18")
    assert copy.flags == {"chown": "1:2", "from": "build"}
    assert copy.args == "/src/app /usr/local/bin/app"
    assert (cmd.name, cmd.args, cmd.flags) == ("CMD", '["app", "--serve"]', {})
    assert exec_form(cmd.args) == ["app", "--serve"]


def test_backtick_escape_directive() -> None:
    text = (
        "# escape=`\nFROM mcr.microsoft.com/windows\nRUN dir C:\\ `\n    && echo done\nCOPY a\\b C:\\dst\\\n"
    )
    dockerfile = parse(text)
    assert dockerfile.escape == "`"
    run, copy = dockerfile.stages[0].instructions
    assert (run.line, run.args) == (3, "dir C:\\     && echo done")
    # A backslash is an ordinary character now, also at the end of a line.
    assert (copy.line, copy.args) == (5, "a\\b C:\\dst\\")


def test_escape_directive_may_follow_other_directives() -> None:
    text = "# syntax=docker/dockerfile:1\n#check=skip=all\n  # ESCAPE = `\nFROM a\nRUN x `\n  y\n"
    dockerfile = parse(text)
    assert dockerfile.escape == "`"
    assert [(i.line, i.args) for i in dockerfile.stages[0].instructions] == [(5, "x   y")]


def test_escape_directive_after_a_comment_is_a_comment() -> None:
    # Directives must come first; here the backtick stays ordinary and `RUN a `` ends its line.
    dockerfile = parse("# a comment\n# escape=`\nFROM a\nRUN a `\n")
    assert dockerfile.escape == "\\"
    assert dockerfile.stages[0].instructions[0].args == "a `"


def test_doubled_escape_at_end_of_line_is_not_a_continuation() -> None:
    dockerfile = parse("FROM a\nENV C trailing\\\\backslash\\\\\nENV D not appended to C\n")
    env_c, env_d = dockerfile.stages[0].instructions
    assert (env_c.line, env_c.args) == (2, "C trailing\\\\backslash\\\\")
    assert (env_d.line, env_d.args) == (3, "D not appended to C")


def test_escape_character_alone_on_lines() -> None:
    # BuildKit strips a continuation before looking for the keyword, so `RUN\` and a lone `\` work.
    dockerfile = parse("FROM a\nRUN\\\n  echo hi\n\\\nENV E hello\\\n\\\nworld\n")
    run, env = dockerfile.stages[0].instructions
    assert (run.name, run.line, run.args) == ("RUN", 2, "echo hi")
    assert (env.name, env.line, env.args) == ("ENV", 4, "E helloworld")


@pytest.mark.parametrize(
    "text",
    [
        "FROM a\nRUN x \\",
        "FROM a\nRUN x \\\n",
        "FROM a\nRUN x \\\n\n\n",
        "FROM a\nRUN x \\\n# trailing comment",
    ],
)
def test_continuation_at_end_of_file_keeps_the_instruction(text: str) -> None:
    assert [(i.name, i.args) for i in parse(text).stages[0].instructions] == [("RUN", "x")]


def test_crlf_line_endings_and_byte_order_mark() -> None:
    dockerfile = parse("\ufeffFROM a\r\nRUN one \\\r\n  two\r\nUSER app\r\n")
    assert dockerfile.stages[0].base == "a"
    assert [(i.line, i.name, i.args) for i in dockerfile.stages[0].instructions] == [
        (2, "RUN", "one   two"),
        (4, "USER", "app"),
    ]


def test_keywords_are_case_insensitive_and_the_last_line_needs_no_newline() -> None:
    dockerfile = parse("from a as One\nrun echo hi\nWorkDir /x")
    assert dockerfile.stages[0].name == "one"
    assert [(i.name, i.args) for i in dockerfile.stages[0].instructions] == [
        ("RUN", "echo hi"),
        ("WORKDIR", "/x"),
    ]


@pytest.mark.parametrize(
    ("line", "flags", "args"),
    [
        ("COPY --chown=1:2 --from=build a b", {"chown": "1:2", "from": "build"}, "a b"),
        ("COPY --link a b", {"link": ""}, "a b"),
        ('COPY --chown="app user" a b', {"chown": "app user"}, "a b"),
        ("COPY --chmod=0755 -- --odd-name b", {"chmod": "0755"}, "--odd-name b"),
        (
            "RUN --mount=type=cache,target=/root/.cache pip install x",
            {"mount": "type=cache,target=/root/.cache"},
            "pip install x",
        ),
        ("RUN echo --not-a-flag", {}, "echo --not-a-flag"),
        ('RUN "--quoted" x', {}, '"--quoted" x'),
        (
            "HEALTHCHECK --interval=5s --retries=3 CMD curl -f http://localhost/",
            {"interval": "5s", "retries": "3"},
            "CMD curl -f http://localhost/",
        ),
    ],
)
def test_leading_flags(line: str, flags: Mapping[str, str], args: str) -> None:
    instruction = parse(f"FROM a\n{line}\n").stages[0].instructions[0]
    assert dict(instruction.flags) == flags
    assert instruction.args == args


def test_parse_substitutes_nothing() -> None:
    dockerfile = parse('FROM a\nENV PATH="/opt/bin:$PATH" HOME=${HOME:-/root}\nRUN echo "$HOME" \'$X\'\n')
    env, run = dockerfile.stages[0].instructions
    assert env.args == 'PATH="/opt/bin:$PATH" HOME=${HOME:-/root}'
    assert run.args == "echo \"$HOME\" '$X'"


def test_instruction_error_names_place_and_instruction() -> None:
    instruction = parse("FROM a\n\nEXPOSE 80/tcp\n", "app/Dockerfile").stages[0].instructions[0]
    error = instruction.error("bad port")
    assert isinstance(error, InputError)
    assert str(error) == "app/Dockerfile:3: EXPOSE: bad port"


def test_instruction_is_immutable_and_hashable() -> None:
    instruction = Instruction("RUN", "true", 2, "Dockerfile:2", {"network": "none"})
    with pytest.raises(AttributeError):
        instruction.args = "false"  # type: ignore[misc]
    assert hash(instruction) == hash(Instruction("RUN", "true", 2, "Dockerfile:2", {"network": "none"}))


STAGES = "FROM a AS Base\nFROM base AS test\nFROM a\n"


@pytest.mark.parametrize(
    ("target", "index"),
    [(None, 2), ("base", 0), ("BASE", 0), ("Test", 1), ("0", 0), ("2", 2)],
)
def test_stage_index(target: str | None, index: int) -> None:
    assert parse(STAGES).stage_index(target) == index


@pytest.mark.parametrize("target", ["prod", "3", "-1", ""])
def test_stage_index_unknown(target: str) -> None:
    dockerfile: Dockerfile = parse(STAGES, "x/Dockerfile")
    with pytest.raises(DockerfileError) as caught:
        dockerfile.stage_index(target)
    assert str(caught.value) == f"x/Dockerfile: no build stage named {target!r} (stages: base, test, 2)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "D: the file has no instructions"),
        ("# only a comment\n\n   \n", "D: the file has no instructions"),
        ("ARG A=1\nARG B\n", "D: no FROM instruction"),
        ("FROM a\n\nONBUILD RUN make\n", "D:3: ONBUILD is not supported"),
        ("FROM a\nFOO bar\n", "D:2: unknown instruction FOO"),
        ("ARG A\nRUN make\nFROM a\n", "D:2: RUN before the first FROM"),
        ("# comment\nENV A=1\nFROM a\n", "D:2: ENV before the first FROM"),
        ("FROM\n", "D:1: FROM: expected 'FROM [--platform=PLATFORM] IMAGE [AS NAME]', got ''"),
        ("FROM a b\n", "D:1: FROM: expected 'FROM [--platform=PLATFORM] IMAGE [AS NAME]', got 'a b'"),
        ("FROM a AS\n", "D:1: FROM: expected"),
        ("FROM a FOR b\n", "D:1: FROM: expected"),
        ("FROM a AS b c\n", "D:1: FROM: expected"),
        ("FROM a AS 1st\n", "D:1: FROM: invalid build stage name '1st'"),
        (
            "FROM a AS x\nRUN y\nFROM b as X\n",
            "D:3: FROM: duplicate build stage name 'x' (first used at line 1)",
        ),
        ("FROM a\nRUN <<EOF\necho hi\nEOF\n", "D:2: RUN: heredocs are not supported"),
        ("FROM a\nRUN cat <<-EOF > /etc/motd\n\thi\nEOF\n", "D:2: RUN: heredocs are not supported"),
        ("FROM a\nRUN python3 - << 'PY'\nprint(1)\nPY\n", "D:2: RUN: heredocs are not supported"),
        ('FROM a\nCOPY <<"EOF" /x\nhi\nEOF\n', "D:2: COPY: heredocs are not supported"),
        ("FROM a\nRUN apt-get update && \\\n  cat <<EOF\nx\nEOF\n", "D:2: RUN: heredocs are not supported"),
        ('FROM a\nCMD ["app", 1]\n', "D:2: CMD: a JSON array (exec form) must hold strings only"),
        (
            "FROM a\nRUN --mount=type=cache --mount=type=tmpfs make\n",
            "D:2: RUN: flag --mount given more than once",
        ),
        ("FROM a\nCOPY --=x a b\n", "D:2: COPY: invalid flag '--=x'"),
        ("# escape=x\nFROM a\n", "D:1: invalid escape character 'x'"),
        ("# escape=`\n# escape=\\\nFROM a\n", "D:2: only one escape parser directive can be used"),
        ("FROM a\nRUN echo \udcff\n", "D: not valid UTF-8 text"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(DockerfileError) as caught:
        parse(text, "D")
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "line",
    [
        "RUN echo '<<EOF'",
        "RUN echo a<<b",
        "RUN cat <<< word",
        "RUN echo $((1<<2))",
        'RUN ["cat", "<<EOF"]',
        "CMD cat <<EOF",
    ],
)
def test_not_heredocs(line: str) -> None:
    instruction = parse(f"FROM a\n{line}\n").stages[0].instructions[0]
    assert instruction.args == line.split(" ", 1)[1]


ENV = {"PWD": "/home", "EMPTY": "", "SPACED": "  a  b ", "V": "1.2.3", "FILE": "dir/sub/name.tar.gz"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", "plain text"),
        ("$PWD/x", "/home/x"),
        ("${PWD}x", "/homex"),
        ("a$UNSET-b", "a-b"),
        ("${UNSET}", ""),
        ("$1x", "x"),  # positional parameters are never set
        ("$$", ""),  # so are special parameters: `$$` is not a literal dollar
        ("$", "$"),
        ("a$.b", "a$.b"),  # a `$` before no name stays
        ("cost: 5$ ", "cost: 5$ "),
        ("${UNSET:-fallback}", "fallback"),
        ("${EMPTY:-fallback}", "fallback"),
        ("${EMPTY-fallback}", ""),
        ("${UNSET-fallback}", "fallback"),
        ("${PWD:-fallback}", "/home"),
        ("${PWD:+set}", "set"),
        ("${EMPTY:+set}", ""),
        ("${EMPTY+set}", "set"),
        ("${UNSET+set}", ""),
        ("${UNSET:-${PWD}/sub}", "/home/sub"),
        ("${UNSET:-'lit $PWD'}", "lit $PWD"),
        ("${V%.*}", "1.2"),
        ("${V%%.*}", "1"),
        ("${V#*.}", "2.3"),
        ("${FILE##*/}", "name.tar.gz"),
        ("${FILE/sub/new}", "dir/new/name.tar.gz"),
        ("${V//./-}", "1-2-3"),
        ("'$PWD \\n'", "$PWD \\n"),
        ('"$PWD  x"', "/home  x"),
        ('"a\\"b\\$c\\\\d\\e"', 'a"b$c\\d\\e'),  # only ", $ and the escape character are escaped
        ("\\$PWD", "$PWD"),
        ("a\\ b\\tc", "a btc"),
        ("\\\\$PWD", "\\/home"),
        ("end\\", "end"),
        ("he'll'o \"wor\"ld", "hello world"),
        ('"it\'s"', "it's"),
        ("'say \"hi\"'", 'say "hi"'),
    ],
)
def test_expand(text: str, expected: str) -> None:
    assert expand(text, ENV, "D:1") == expected


def test_expand_with_backtick_escape() -> None:
    assert expand("C:\\dir `$PWD", ENV, "D:1", escape="`") == "C:\\dir $PWD"
    assert expand('"a`"b" `\\', ENV, "D:1", escape="`") == 'a"b \\'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("'open", "unterminated single quote"),
        ('"open', "unterminated double quote"),
        ('"escaped end\\"', "unterminated double quote"),
        ("${PWD", "missing '}'"),
        ("${", "missing '}'"),
        ("${}", "bad substitution"),
        ("${:-x}", "bad substitution"),
        ("${UNSET:-x", "missing '}'"),
        ("${PWD:=x}", "unsupported modifier (:=)"),
        ("${UNSET?must be set}", "UNSET: must be set"),
        ("${EMPTY:?}", "EMPTY: is not allowed to be empty"),
    ],
)
def test_expand_errors(text: str, message: str) -> None:
    with pytest.raises(DockerfileError) as caught:
        expand(text, ENV, "D:7")
    assert str(caught.value).startswith(f"D:7: {message}")


def test_expand_error_is_one_line() -> None:
    with pytest.raises(DockerfileError) as caught:
        expand("${UNSET?line one\nline two}", ENV, "D:7")
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("D:7: UNSET: line one\\nline two")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a  b\tc", ["a", "b", "c"]),
        ("  lead trail  ", ["lead", "trail"]),
        ('"a b" c', ["a b", "c"]),
        ("'a  b'c d", ["a  bc", "d"]),
        ("a\\ b", ["a b"]),
        ('"" x', ["", "x"]),
        ("x ''", ["x", ""]),
        ("$SPACED", ["a", "b"]),  # substitutions are split like unquoted text
        ("x${SPACED}y", ["x", "a", "b", "y"]),
        ('"$SPACED"', ["  a  b "]),
        ("$UNSET", []),
        ("", []),
        ("${UNSET:-one two}", ["one", "two"]),
        ("80/tcp $V", ["80/tcp", "1.2.3"]),
    ],
)
def test_words(text: str, expected: list[str]) -> None:
    assert words(text, ENV, "D:1") == expected


def test_words_error() -> None:
    with pytest.raises(DockerfileError, match=r"^D:2: unterminated double quote"):
        words('a "b', ENV, "D:2")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1", [("A", "1")]),
        ('A=1 B="two words" C=', [("A", "1"), ("B", "two words"), ("C", "")]),
        ("PATH=$PWD/bin:$PATH", [("PATH", "/home/bin:")]),
        ("A=x\\ y B='$PWD'", [("A", "x y"), ("B", "$PWD")]),
        (
            '"com.example.vendor"="ACME Inc" version=$V',
            [("com.example.vendor", "ACME Inc"), ("version", "1.2.3")],
        ),
        ("A=b=c", [("A", "b=c")]),
        ("NAME value with  spaces", [("NAME", "value with  spaces")]),
        ("NAME   $PWD/x", [("NAME", "/home/x")]),
        ('MSG "quoted" value', [("MSG", "quoted value")]),
    ],
)
def test_key_values(text: str, expected: list[tuple[str, str]]) -> None:
    assert key_values(text, ENV, "D:3") == expected


def test_key_values_with_backtick_escape() -> None:
    assert key_values('P=C:\\a`$ Q=`"x', ENV, "D:3", escape="`") == [("P", "C:\\a$"), ("Q", '"x')]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "D:3: expected KEY=VALUE"),
        ("A=1 B", "D:3: expected KEY=VALUE, got 'B'"),
        ("A=1 =2", "D:3: expected KEY=VALUE, got '=2'"),
        ("ALONE", "D:3: 'ALONE' has no value"),
        ('A="open', "D:3: unterminated double quote"),
    ],
)
def test_key_values_errors(text: str, message: str) -> None:
    with pytest.raises(DockerfileError) as caught:
        key_values(text, ENV, "D:3")
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("VERSION", [("VERSION", None)]),
        ("VERSION=1.0", [("VERSION", "1.0")]),
        ("A B=", [("A", None), ("B", "")]),
        ('_X="a b" Y=${V}-rc', [("_X", "a b"), ("Y", "1.2.3-rc")]),
        ("URL=http://x/?a=b", [("URL", "http://x/?a=b")]),
    ],
)
def test_arg_declarations(text: str, expected: list[tuple[str, str | None]]) -> None:
    assert arg_declarations(text, ENV, "D:4") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "D:4: expected NAME"),
        ("1ABC=x", "D:4: invalid ARG name '1ABC'"),
        ("A-B", "D:4: invalid ARG name 'A-B'"),
        ("=x", "D:4: invalid ARG name ''"),
        ("A='x", "D:4: unterminated single quote"),
    ],
)
def test_arg_declarations_errors(text: str, message: str) -> None:
    with pytest.raises(DockerfileError) as caught:
        arg_declarations(text, ENV, "D:4")
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('["a", "b c"]', ["a", "b c"]),
        ('  [ "/bin/sh", "-c" ]  ', ["/bin/sh", "-c"]),
        ("[]", []),
        ('["\\u2603", "tab\\t"]', ["\u2603", "tab\t"]),
        ("echo hi", None),
        ("[ -f /x ] && echo yes", None),  # starts with `[` but is not JSON: shell form
        ("['single', 'quotes']", None),
        ('["unterminated"', None),
        ('["a", 1]', None),
        ('{"a": "b"}', None),
        ('"string"', None),
    ],
)
def test_exec_form(text: str, expected: list[str] | None) -> None:
    assert exec_form(text) == expected
