"""Tests of supermachine.build.ignore: .dockerignore rules with moby patternmatcher semantics.

Many single-pattern cases come from moby/patternmatcher's own TestMatches table, so a divergence from
docker shows up here as a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from supermachine.build.ignore import MAX_IGNORE_FILE_BYTES, IgnoreRules
from supermachine.errors import InputError


def rules(*lines: str) -> IgnoreRules:
    return IgnoreRules.parse("\n".join(lines))


# --- reading the file: comments, blanks, whitespace, cleaning --------------------------------------

PARSE_CASES: list[tuple[str, tuple[str, ...]]] = [
    ("", ()),
    ("\n\n   \n\t\n", ()),
    ("# a comment\n*.pyc\n#another", ("*.pyc",)),
    # docker only treats "#" in the first column as a comment
    ("  # not a comment", ("# not a comment",)),
    ("\ufeff# comment after a byte order mark\nx", ("x",)),
    ("\ufeffx", ("x",)),
    ("  a  \n\tb\t\n", ("a", "b")),
    ("a\r\nb\r\n", ("a", "b")),
    ("a\u3000\n\xa0b", ("a", "b")),
    ("./a", ("a",)),
    ("a//b", ("a/b",)),
    ("a/../b", ("b",)),
    ("a/./b/", ("a/b",)),
    ("/a/b", ("a/b",)),
    ("//a", ("a",)),
    ("/../a", ("a",)),
    ("../a", ("../a",)),
    ("/", ("/",)),
    ("a/..", (".",)),
    ("!a", ("!a",)),
    ("!   a  ", ("!a",)),
    ("! /a/../b/", ("!b",)),
    # moby strips the slash before it looks for "!", so this is an exception
    ("/!a", ("!a",)),
    ("*.md\n!README.md\n", ("*.md", "!README.md")),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_cleans_patterns(text: str, expected: tuple[str, ...]) -> None:
    assert IgnoreRules.parse(text).patterns == expected


def test_comment_and_blank_lines_exclude_nothing() -> None:
    parsed = IgnoreRules.parse("# secret\n\n   \n")
    assert parsed.patterns == ()
    assert not parsed.excluded("secret")
    assert not parsed.excluded("# secret")


def test_indented_hash_is_a_pattern() -> None:
    assert IgnoreRules.parse("  #notes").excluded("#notes")


def test_equal_rules_compare_and_hash_equal() -> None:
    assert rules("./a", "!/b") == rules("a", "!b")
    assert hash(rules("./a")) == hash(rules("a"))
    assert rules("a") != rules("b")
    assert repr(rules("a", "!b")) == "IgnoreRules(['a', '!b'])"


# --- one pattern against one path ------------------------------------------------------------------

MATCH_CASES: list[tuple[str, str, bool]] = [
    # plain names and parent directories
    ("node_modules", "node_modules", True),
    ("node_modules", "node_modules/x/y", True),
    ("node_modules", "src/node_modules", False),
    ("node_modules", "node_modules2", False),
    ("build/out", "build/out/a.o", True),
    ("build/out", "build", False),
    ("build/out", "build/output", False),
    # cleaning and the leading slash
    ("/a/b", "a/b", True),
    ("./a", "a/x", True),
    ("a/../b", "b", True),
    ("a//b", "a/b", True),
    ("/", "x", False),
    ("..", "x", False),
    # *
    ("*", "file", True),
    ("*", "dir/file", True),
    ("*.go", "main.go", True),
    ("*.go", "cmd/main.go", False),
    ("*/*.go", "cmd/main.go", True),
    ("*.go", "main.go/inner", True),
    ("a*", "abc/d", True),
    ("a/*.txt", "a/dir/file.txt", False),
    ("a/*.txt", "a/file.txt", True),
    # ?
    ("abc?def", "abcZdef", True),
    ("abc?def", "abcdef", False),
    ("a?b", "a/b", False),
    # regexp metacharacters are literal
    (".*", ".foo", True),
    (".*", "foo", False),
    ("abc.def", "abcZdef", False),
    ("abc.def", "abc.def", True),
    ("a(b)c/def", "a(b)c/def", True),
    ("a(b)c/def", "a(b)c/xyz", False),
    ("a.|)$(}+{bc", "a.|)$(}+{bc", True),
    ("a^*", "a^x", True),
    ("dist/*.whl", "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", True),
    # character classes
    ("a[b-d]e", "ace", True),
    ("a[b-d]e", "ae", False),
    ("a[b-d]e", "aae", False),
    ("a[^b-d]e", "aze", True),
    ("a[^b-d]e", "ace", False),
    ("[xyz]", "y", True),
    ("[xyz]", "w", False),
    ("[!a]x", "!x", True),  # Go's classes negate with ^ only; ! is literal
    ("[!a]x", "bx", False),
    ("[a\\]]b", "]b", True),
    ("[a\\-]b", "-b", True),
    ("[*]", "*", True),
    ("[*]", "x", False),
    ("[\u03b1-\u03c9]", "\u03bb", True),  # Greek alpha to omega
    # escapes
    ("a\\*b", "a*b", True),
    ("a\\*b", "axb", False),
    ("a\\\\", "a\\", True),
    ("\\[x\\]", "[x]", True),
    ("a\\?", "a?", True),
    ("a\\?", "ab", False),
    # **
    ("**", "file", True),
    ("**", "dir/file", True),
    ("**/", "file", True),
    ("**/**", "dir/file", True),
    ("dir/**", "dir/file", True),
    ("dir/**", "dir/dir2/file", True),
    ("dir/**", "dir", False),
    ("**/dir", "dir", True),
    ("**/dir", "dir/file", True),
    ("**/dir", "x/y/dir", True),
    ("**/dir", "xdir", False),
    ("**/dir2/*", "dir/dir2/file", True),
    ("**/dir2/**", "dir/dir2/dir3/file", True),
    ("**file", "dir/dir/file", True),
    ("**file", "xfile", True),  # moby matches "**" + text by suffix
    ("**/file*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt", "dir/dir/file.txt", True),
    ("**/**/*.txt2", "dir/dir/file.txt", False),
    ("**/*.txt", "file.txt", True),
    ("**/*.go", "a/b/c.go", True),
    ("**/*.go", "a/b/c.gox", False),
    ("**/.foo", ".foo", True),
    ("**/.foo", "bar.foo", False),
    ("a**/*.txt", "a/dir/dir/file.txt", True),
    ("a/*.txt**", "a/file.txt", True),
    ("a/**/b", "a/b", True),
    ("a/**/b", "a/x/y/b", True),
    ("a/**/b", "a/x/y/bc", False),
    ("a/**/b", "a/b/c", True),
    ("abc/**", "abc/def/ghi", True),
    # a file name with a newline is still covered by **
    ("**/*.c", "a\nb/x.c", True),
]


@pytest.mark.parametrize(("pattern", "path", "expected"), MATCH_CASES)
def test_single_pattern(pattern: str, path: str, expected: bool) -> None:
    assert rules(pattern).excluded(path) is expected


# --- several patterns: exceptions and ordering -----------------------------------------------------

MULTI_CASES: list[tuple[tuple[str, ...], str, bool]] = [
    ((), "anything", False),
    (("*.md", "!README.md"), "README.md", False),
    (("*.md", "!README.md"), "CHANGES.md", True),
    # the last matching pattern wins
    (("!README.md", "*.md"), "README.md", True),
    (("*.md", "!*.md", "*.md"), "x.md", True),
    (("*.md", "!*.md"), "x.md", False),
    # a file re-included inside an excluded directory
    (("docs", "!docs/README.md"), "docs/README.md", False),
    (("docs", "!docs/README.md"), "docs/other.md", True),
    (("docs", "!docs/README.md"), "docs", True),
    (("docs/", "!docs/README.md"), "docs/README.md", False),
    (("docs/*", "!docs/README.md"), "docs/README.md", False),
    (("dir", "!dir/keep"), "dir/keep/inner", False),
    # an exception matching a parent directory re-includes everything below it
    (("**", "!util/docker/web"), "util/docker/web/foo", False),
    (("**", "!util/docker/web"), "util/docker", True),
    (("**", "!util/docker/web", "util/docker/web/foo"), "util/docker/web/foo", True),
    (("**", "!dist/*.whl"), "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl", False),
    (("*", "!src", "src/*.tmp"), "src/a.c", False),
    (("*", "!src", "src/*.tmp"), "src/a.tmp", True),
    (("*", "!src", "src/*.tmp"), "src/d/a.tmp", False),
    (("a", "!a/b", "a/b/c"), "a/b/c/d", True),
    (("a", "!a/b", "a/b/c"), "a/b/x", False),
    (("a", "!a/b", "a/b/c"), "a/x", True),
    # the context root itself is never excluded
    (("**",), ".", False),
    (("**",), "", False),
]


@pytest.mark.parametrize(("lines", "path", "expected"), MULTI_CASES)
def test_exceptions_and_order(lines: tuple[str, ...], path: str, expected: bool) -> None:
    assert rules(*lines).excluded(path) is expected


# --- may_include_below: may a walker skip an excluded directory? -----------------------------------

BELOW_CASES: list[tuple[tuple[str, ...], str, bool]] = [
    (("dir", "!dir/keep"), "dir", True),
    (("dir",), "dir", False),
    (("dir", "!other/keep"), "dir", False),
    # an exception before the exclusion is overridden by it
    (("!dir/keep", "dir"), "dir", False),
    (("*", "!**/keep"), "any/dir", True),
    (("*", "!*.md"), "docs", False),
    (("*", "!*/*.md"), "docs", True),
    (("*", "!*/*.md"), "docs/sub", False),
    (("build", "!build/**/*.keep"), "build", True),
    (("build", "!build/**/*.keep"), "build/a/b", True),
    (("a/**", "!a/b/**"), "a/c", False),
    (("a/**", "!a/b/**"), "a/b", True),
    (("secret*", "!secrets-public"), "secrets", False),
    (("*", "![ab]/k?ep"), "a", True),
    (("*", "![ab]/k?ep"), "c", False),
    (("**", "!a\\*b/c"), "a*b", True),
    (("**", "!a\\*b/c"), "axb", False),
    (("**", "!x**"), "xy", True),
    (("**", "!x**"), "y", False),
    # not excluded: the walker descends anyway
    (("x",), "y", True),
    ((), "y", True),
]


@pytest.mark.parametrize(("lines", "directory", "expected"), BELOW_CASES)
def test_may_include_below(lines: tuple[str, ...], directory: str, expected: bool) -> None:
    assert rules(*lines).may_include_below(directory) is expected


def test_reinclusion_inside_excluded_dir() -> None:
    parsed = rules("dir", "!dir/keep")
    assert parsed.excluded("dir")
    assert parsed.may_include_below("dir")
    assert not parsed.excluded("dir/keep")
    assert parsed.excluded("dir/drop")


_SEGMENTS = st.sampled_from(["a", "b", "ab", "ba", "a.b"])
_PATHS = st.lists(_SEGMENTS, min_size=1, max_size=4).map("/".join)
_PATTERNS = st.lists(
    st.tuples(st.booleans(), st.text(alphabet="ab*?/.", min_size=1, max_size=6)).map(
        lambda item: ("!" if item[0] else "") + item[1]
    ),
    max_size=4,
)


@given(_PATTERNS, _PATHS, _PATHS)
def test_skipped_directories_hold_no_included_paths(patterns: list[str], directory: str, rest: str) -> None:
    # The contract a walker relies on: when may_include_below says no, everything below is excluded.
    try:
        parsed = rules(*patterns)
    except InputError:
        assume(False)
        return
    if not parsed.may_include_below(directory):
        assert parsed.excluded(directory)
        assert parsed.excluded(f"{directory}/{rest}")


# --- invalid patterns ------------------------------------------------------------------------------

BAD_PATTERNS = [
    "[",
    "a[",
    "[]",
    "[^]",
    "[a",
    "[a-",
    "[a-]",
    "[-a]",
    "[z-a]",
    "[a-b-c]",
    "[\\",
    "a\\",
    "!",
    "!/",
    "ok\n*.[",
]


@pytest.mark.parametrize("text", BAD_PATTERNS)
def test_bad_pattern(text: str) -> None:
    with pytest.raises(InputError, match=r"^\.dockerignore: bad pattern ") as caught:
        IgnoreRules.parse(text)
    assert "\n" not in str(caught.value)


def test_bad_pattern_message_names_the_pattern() -> None:
    with pytest.raises(InputError) as caught:
        IgnoreRules.parse("ok\n  src/[a  \n")
    assert str(caught.value) == ".dockerignore: bad pattern 'src/[a'"


# --- load() ----------------------------------------------------------------------------------------


def test_load_without_file_has_no_rules(tmp_path: Path) -> None:
    loaded = IgnoreRules.load(tmp_path, "Dockerfile")
    assert loaded.patterns == ()
    assert not loaded.excluded("anything")


def test_load_reads_dockerignore(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_bytes(b"\xef\xbb\xbf# deps\nnode_modules\n*.log\n!keep.log\n")
    loaded = IgnoreRules.load(tmp_path)
    assert loaded.patterns == ("node_modules", "*.log", "!keep.log")
    assert loaded.excluded("node_modules/left-pad/index.js")
    assert loaded.excluded("debug.log")
    assert not loaded.excluded("keep.log")
    assert not loaded.excluded("src/main.py")


def test_per_dockerfile_ignore_file_takes_precedence(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("general\n")
    (tmp_path / "Dockerfile.dockerignore").write_text("specific\n")
    assert IgnoreRules.load(tmp_path, "Dockerfile").patterns == ("specific",)
    # only with a Dockerfile name
    assert IgnoreRules.load(tmp_path).patterns == ("general",)
    # another Dockerfile has no ignore file of its own
    assert IgnoreRules.load(tmp_path, "Dockerfile.dev").patterns == ("general",)


def test_per_dockerfile_ignore_file_in_subdirectory(tmp_path: Path) -> None:
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "app.Dockerfile.dockerignore").write_text("tests\n")
    (tmp_path / ".dockerignore").write_text("general\n")
    assert IgnoreRules.load(tmp_path, "docker/app.Dockerfile").patterns == ("tests",)


def test_symlinked_dockerignore_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x\n")
    (tmp_path / ".dockerignore").symlink_to("real")
    with pytest.raises(InputError, match="symbolic link") as caught:
        IgnoreRules.load(tmp_path)
    assert str(tmp_path / ".dockerignore") in str(caught.value)


def test_symlinked_per_dockerfile_ignore_is_refused_not_skipped(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_text("x\n")
    (tmp_path / "Dockerfile.dockerignore").symlink_to("/nonexistent")
    with pytest.raises(InputError, match="symbolic link"):
        IgnoreRules.load(tmp_path, "Dockerfile")


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_non_regular_dockerignore_is_refused(tmp_path: Path, kind: str) -> None:
    target = tmp_path / ".dockerignore"
    if kind == "directory":
        target.mkdir()
    else:
        os.mkfifo(target)
    with pytest.raises(InputError, match="not a regular file"):
        IgnoreRules.load(tmp_path)


def test_size_limit(tmp_path: Path) -> None:
    line = b"a" * 1023 + b"\n"
    (tmp_path / ".dockerignore").write_bytes(line * (MAX_IGNORE_FILE_BYTES // len(line)))
    assert IgnoreRules.load(tmp_path).patterns == ("a" * 1023,) * (MAX_IGNORE_FILE_BYTES // 1024)
    (tmp_path / ".dockerignore").write_bytes(b"x" * (MAX_IGNORE_FILE_BYTES + 1))
    with pytest.raises(InputError, match="larger than"):
        IgnoreRules.load(tmp_path)


def test_invalid_utf8_names_the_file(tmp_path: Path) -> None:
    (tmp_path / ".dockerignore").write_bytes(b"ok\nbad\xff\n")
    with pytest.raises(InputError, match="not valid UTF-8") as caught:
        IgnoreRules.load(tmp_path)
    assert str(tmp_path / ".dockerignore") in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_pattern_in_per_dockerfile_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile.dockerignore").write_text("[\n")
    with pytest.raises(InputError) as caught:
        IgnoreRules.load(tmp_path, "Dockerfile")
    assert str(caught.value) == "Dockerfile.dockerignore: bad pattern '['"
