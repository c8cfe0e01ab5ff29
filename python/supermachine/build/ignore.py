"""``.dockerignore`` rules: which files of a build context a build may see.

``supermachine build`` must send a builder the same files ``docker build`` (BuildKit) and ``buildah``
would, so this module follows moby's ``patternmatcher`` package (``New`` and
``MatchesOrParentMatches``) and its ``ignorefile.ReadAll`` reader, quirks included:

* one pattern per line; a line whose first character is ``#`` is a comment (``  # x`` is a pattern,
  as in docker); a UTF-8 byte order mark before the first line is dropped; blank lines are skipped;
* surrounding whitespace is trimmed, and a leading ``!`` makes the pattern an exception that
  re-includes what it matches (whitespace after the ``!`` is trimmed too);
* patterns are cleaned like Go's ``filepath.Clean`` (``./a`` -> ``a``, ``a//b`` -> ``a/b``,
  ``a/../b`` -> ``b``) and a leading ``/`` is dropped: patterns are relative to the context root;
* ``*`` matches any run of characters other than ``/``, ``?`` one such character, ``[...]`` a
  character class (ranges ``a-z``, ``^`` negates), ``\\`` makes the next character literal, and
  ``**`` any number of directories, including none (``**/*.go``, ``a/**/b``, ``a/**``, ``**``);
* a pattern matches a path when it matches the path or one of its parent directories, so ``dir``
  excludes all of ``dir/...`` and ``!dir`` re-includes all of it;
* the last pattern that matches decides.

Where moby's translation of a pattern into a Go regexp is accidental rather than designed (``^``
outside a class becomes an anchor that never matches, ``\\d`` a digit class, ``*`` or ``?`` inside
``[...]`` garble the class, ``**`` stops at a newline in a file name), the documented
``filepath.Match`` meaning is used instead: ``^`` and escaped characters are literal, classes are
classes, ``**`` spans any name.

Typical use by a context walker::

    rules = IgnoreRules.load(context, "Dockerfile")
    for each entry, by its context-relative path:
        if not rules.excluded(path): send it
        elif is a directory and not rules.may_include_below(path): skip the whole subtree

The Dockerfile and the ignore file themselves are sent by docker even when excluded; that is for the
caller to decide, this module does not special-case them.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from supermachine.errors import InputError

__all__ = ["IGNORE_FILE_NAME", "MAX_IGNORE_FILE_BYTES", "IgnoreRules"]

IGNORE_FILE_NAME: Final = ".dockerignore"
MAX_IGNORE_FILE_BYTES: Final = 1024 * 1024
"""Refuse larger ignore files: a real one is a few hundred bytes, and each pattern costs per file."""

# Go's strings.TrimSpace trims the characters unicode.IsSpace accepts. Python's str.strip() also trims
# the ASCII separators \x1c-\x1f, which Go keeps as part of the pattern, so the set is spelled out.
_GO_SPACE: Final = "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(
    map(chr, range(0x2000, 0x200B))
)

# How a pattern is matched. moby keeps literal patterns (and literal ones ending or starting with
# "**") out of its regexp engine; the shortcuts are not always equivalent to the regexp (``**foo``
# matches ``xfoo`` by suffix, the regexp would not), so they are reproduced, not optimised away.
_EXACT: Final = 0  # the path equals the pattern
_PREFIX: Final = 1  # literal text followed by "**": the path starts with the text
_SUFFIX: Final = 2  # "**" followed by literal text (or nothing): the path ends with the text
_REGEX: Final = 3

# Token kinds of a pattern, each a piece of the regular expression it stands for.
_LITERAL: Final = 0  # one literal character
_STAR: Final = 1  # "*": [^/]*
_ONE: Final = 2  # "?": [^/]
_CLASS: Final = 3  # "[...]"
_ANY_DIRS: Final = 4  # "**" or "**/" followed by more pattern: (.*/)?
_ANY_TAIL: Final = 5  # "**" ending the pattern: .*


class _BadPattern(ValueError):
    """Raised inside the pattern compiler; turned into an InputError that names the pattern."""


@dataclass(frozen=True, slots=True)
class _Token:
    kind: int
    char: str = ""
    negated: bool = False
    ranges: tuple[tuple[str, str], ...] = ()

    def regex(self) -> str:
        if self.kind == _LITERAL:
            return re.escape(self.char)
        if self.kind == _STAR:
            return "[^/]*"
        if self.kind == _ONE:
            return "[^/]"
        if self.kind == _ANY_DIRS:
            return "(?:.*/)?"
        if self.kind == _ANY_TAIL:
            return ".*"
        # \U escapes keep every character literal inside the class, whatever it is (] ^ - \ [).
        items = "".join(
            f"\\U{ord(lo):08x}" if lo == hi else f"\\U{ord(lo):08x}-\\U{ord(hi):08x}"
            for lo, hi in self.ranges
        )
        return f"[{'^' if self.negated else ''}{items}]"

    def accepts(self, ch: str) -> bool:
        """Whether this single-character token (literal, ``?`` or class) matches ``ch``."""
        if self.kind == _LITERAL:
            return ch == self.char
        if self.kind == _ONE:
            return ch != "/"
        # Like Go's filepath.Match (and moby's regexp), a class may match "/" too.
        return any(lo <= ch <= hi for lo, hi in self.ranges) != self.negated


def _go_clean(path: str) -> str:
    """Go's ``filepath.Clean`` on Unix (``posixpath.normpath`` differs: it keeps a leading ``//``)."""
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            # ".." at the root of a rooted path stays at the root.
            continue
        parts.append(part)
    cleaned = "/".join(parts)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


def _class_char(pattern: str, pos: int) -> tuple[str, int]:
    """One (possibly escaped) character of a character class; Go's ``getEsc`` rules."""
    if pos >= len(pattern) or pattern[pos] in "-]":
        raise _BadPattern
    if pattern[pos] == "\\":
        pos += 1
        if pos >= len(pattern):
            raise _BadPattern
    ch = pattern[pos]
    pos += 1
    if pos >= len(pattern):  # the class is never closed
        raise _BadPattern
    return ch, pos


def _parse_class(pattern: str, pos: int) -> tuple[_Token, int]:
    """The class whose ``[`` is just before ``pos``, with the syntax filepath.Match accepts."""
    negated = pos < len(pattern) and pattern[pos] == "^"
    if negated:
        pos += 1
    ranges: list[tuple[str, str]] = []
    while True:
        if ranges and pattern[pos] == "]":
            return _Token(_CLASS, negated=negated, ranges=tuple(ranges)), pos + 1
        lo, pos = _class_char(pattern, pos)
        hi = lo
        if pattern[pos] == "-":
            hi, pos = _class_char(pattern, pos + 1)
        if lo > hi:
            # filepath.Match accepts an empty range but moby's regexp compiler rejects it, which
            # fails the build when the pattern is first used.
            raise _BadPattern
        ranges.append((lo, hi))


def _tokenize(pattern: str) -> tuple[int, tuple[_Token, ...]]:
    """The match kind and tokens of a cleaned pattern (without its ``!``), following moby's compiler."""
    kind = _EXACT
    tokens: list[_Token] = []
    pos = 0
    first = True
    while pos < len(pattern):
        ch = pattern[pos]
        pos += 1
        if ch == "*" and pattern.startswith("*", pos):
            pos += 1
            if pattern.startswith("/", pos):  # "**/" is "**"
                pos += 1
            if pos == len(pattern):
                tokens.append(_Token(_ANY_TAIL))
                kind = _PREFIX if kind == _EXACT else _REGEX
            else:
                tokens.append(_Token(_ANY_DIRS))
                kind = _REGEX
            if first:
                kind = _SUFFIX
        elif ch == "*":
            tokens.append(_Token(_STAR))
            kind = _REGEX
        elif ch == "?":
            tokens.append(_Token(_ONE))
            kind = _REGEX
        elif ch == "\\":
            if pos == len(pattern):
                raise _BadPattern  # filepath.Match rejects a trailing backslash
            tokens.append(_Token(_LITERAL, pattern[pos]))
            pos += 1
            kind = _REGEX
        elif ch == "[":
            token, pos = _parse_class(pattern, pos)
            tokens.append(token)
            kind = _REGEX
        else:
            tokens.append(_Token(_LITERAL, ch))
            if ch == "]":  # moby hands a stray "]" to its regexp engine, which changes the match kind
                kind = _REGEX
        first = False
    return kind, tuple(tokens)


@dataclass(frozen=True, slots=True)
class _Pattern:
    text: str  # cleaned, without the "!"
    exception: bool  # a "!" pattern: re-includes what it matches
    kind: int
    tokens: tuple[_Token, ...]
    regex: re.Pattern[str] | None

    @classmethod
    def compile(cls, pattern: str, source: str, file_name: str) -> _Pattern:
        """patternmatcher.New for one pattern as ignorefile.ReadAll returned it."""
        text = _go_clean(pattern.strip(_GO_SPACE))
        exception = text.startswith("!")
        if exception:
            text = text[1:]
        try:
            if not text:  # "!" alone (or "!/", which Clean turns into "!")
                raise _BadPattern
            kind, tokens = _tokenize(text)
            # DOTALL: moby's "." stops at a newline, so "**" would not cover a file name containing
            # one; excluding such a file too is the safe side of the difference.
            regex = re.compile("".join(t.regex() for t in tokens), re.DOTALL) if kind == _REGEX else None
        except (_BadPattern, re.error):
            raise InputError(f"{file_name}: bad pattern {source!r}") from None
        return cls(text, exception, kind, tokens, regex)

    @property
    def written(self) -> str:
        return f"!{self.text}" if self.exception else self.text

    def matches(self, path: str) -> bool:
        if self.kind == _EXACT:
            return path == self.text
        if self.kind == _PREFIX:
            return path.startswith(self.text[:-2])
        if self.kind == _SUFFIX:
            suffix = self.text[2:]
            # "**/foo" matches "foo" as well as ".../foo"
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None

    def could_match_below(self, directory: str) -> bool:
        """Whether some path inside ``directory`` (``directory/...``) may match; may err towards True."""
        below = directory + "/"
        if self.kind == _EXACT:
            return self.text.startswith(below)
        if self.kind == _PREFIX:
            prefix = self.text[:-2]
            return prefix.startswith(below) or below.startswith(prefix)
        if self.kind == _SUFFIX:
            return True  # "directory/" + the suffix (minus its "/") always ends with it
        return self._prefix_viable(below)

    def _prefix_viable(self, prefix: str) -> bool:
        """Run the tokens as an NFA over ``prefix``: does any match of the pattern start with it?

        A state is (token index, inside the ".*" of a "(.*/)?"). Python's re cannot answer "could
        this string be continued into a match", hence this small interpreter over the same tokens
        the regular expression was built from.
        """
        tokens = self.tokens
        end = len(tokens)

        def closure(states: set[tuple[int, bool]]) -> set[tuple[int, bool]]:
            # "*", "(.*/)?" and ".*" may all match nothing: the next token can start right away.
            pending = list(states)
            while pending:
                index, inside = pending.pop()
                if not inside and index < end and tokens[index].kind in (_STAR, _ANY_DIRS, _ANY_TAIL):
                    following = (index + 1, False)
                    if following not in states:
                        states.add(following)
                        pending.append(following)
            return states

        states = closure({(0, False)})
        for ch in prefix:
            advanced: set[tuple[int, bool]] = set()
            for index, inside in states:
                if index == end:
                    continue
                kind = tokens[index].kind
                if inside or kind == _ANY_DIRS:
                    advanced.add((index, True))
                    if ch == "/":
                        advanced.add((index + 1, False))
                elif kind == _STAR:
                    if ch != "/":
                        advanced.add((index, False))
                elif kind == _ANY_TAIL:
                    advanced.add((index, False))
                elif tokens[index].accepts(ch):
                    advanced.add((index + 1, False))
            states = closure(advanced)
            if not states:
                return False
        # A live state could in principle sit before an unsatisfiable class; True is the safe answer.
        return True


def _read_all(text: str) -> list[tuple[str, str]]:
    """ignorefile.ReadAll: the patterns of an ignore file, each with the line it came from (trimmed)."""
    patterns: list[tuple[str, str]] = []
    # bufio.ScanLines: lines end at "\n", and one "\r" before it is dropped.
    for number, raw in enumerate(text.split("\n")):
        line = raw[:-1] if raw.endswith("\r") else raw
        if number == 0:
            line = line.removeprefix("\ufeff")
        if line.startswith("#"):  # checked before trimming, as docker does
            continue
        pattern = line.strip(_GO_SPACE)
        if not pattern:
            continue
        source = pattern
        exception = pattern.startswith("!")
        if exception:
            pattern = pattern[1:].strip(_GO_SPACE)
        if pattern:
            pattern = _go_clean(pattern)
            if len(pattern) > 1 and pattern.startswith("/"):
                pattern = pattern[1:]
        patterns.append(("!" + pattern if exception else pattern, source))
    return patterns


def _ancestors(path: str) -> list[str]:
    """The parent directories of ``path``, outermost first: ``a/b/c`` -> ``a``, ``a/b``."""
    result: list[str] = []
    slash = path.find("/")
    while slash > 0:
        result.append(path[:slash])
        slash = path.find("/", slash + 1)
    return result


def _read_ignore_file(path: Path) -> bytes | None:
    """The bytes of the regular file at ``path``, or None when there is nothing there."""
    # O_NOFOLLOW: a symlink could point outside the context. O_NONBLOCK: opening a FIFO must not hang
    # (fstat then refuses it).
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{path}: is a symbolic link; an ignore file must be a regular file") from None
        raise InputError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{path}: not a regular file")
        if info.st_size > MAX_IGNORE_FILE_BYTES:
            raise InputError(f"{path}: larger than {MAX_IGNORE_FILE_BYTES} bytes")
        chunks: list[bytes] = []
        size = 0
        # Read one byte past the limit: the file may have grown since fstat.
        while size <= MAX_IGNORE_FILE_BYTES:
            chunk = os.read(fd, MAX_IGNORE_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_IGNORE_FILE_BYTES:
            raise InputError(f"{path}: larger than {MAX_IGNORE_FILE_BYTES} bytes")
        return b"".join(chunks)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


class IgnoreRules:
    """The patterns of one ignore file, ready to decide which context paths a build may see."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Sequence[_Pattern] = ()) -> None:
        self._rules: tuple[_Pattern, ...] = tuple(rules)

    @classmethod
    def load(cls, context: Path, dockerfile_name: str | None = None) -> IgnoreRules:
        """The rules of ``context``: ``<dockerfile_name>.dockerignore``, else ``.dockerignore``, else none.

        The per-Dockerfile file is BuildKit's; a relative ``dockerfile_name`` is taken inside the
        context, an absolute one as is (BuildKit looks next to the Dockerfile). An ignore file must
        be a regular file (a symlink is refused), at most 1 MiB, and UTF-8.
        """
        names = [f"{dockerfile_name}{IGNORE_FILE_NAME}"] if dockerfile_name else []
        names.append(IGNORE_FILE_NAME)
        for name in names:
            path = context / name
            data = _read_ignore_file(path)
            if data is None:
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: not valid UTF-8 (byte {exc.start})") from None
            return cls._from_text(text, name)
        return cls()

    @classmethod
    def parse(cls, text: str) -> IgnoreRules:
        """The rules in ``text``, the contents of a ``.dockerignore`` file."""
        return cls._from_text(text, IGNORE_FILE_NAME)

    @classmethod
    def _from_text(cls, text: str, file_name: str) -> IgnoreRules:
        return cls([_Pattern.compile(pattern, source, file_name) for pattern, source in _read_all(text)])

    @property
    def patterns(self) -> tuple[str, ...]:
        """The cleaned patterns in order, exceptions with their ``!`` (a cache key for the rules)."""
        return tuple(rule.written for rule in self._rules)

    def excluded(self, path: str) -> bool:
        """Whether the build must not see ``path`` (context-relative, ``/``-separated, clean).

        The last pattern matching the path or one of its parent directories decides. The context
        root (``""`` or ``"."``) is never excluded.
        """
        index = self._last_match(path)
        return index is not None and not self._rules[index].exception

    def may_include_below(self, directory: str) -> bool:
        """Whether a walker must descend into ``directory``: False only when nothing below it is seen.

        Only exceptions after the exclusion that matched ``directory`` can re-include anything below
        it (that exclusion matches all of ``directory/...`` too, so earlier patterns are overridden).
        True for a directory that is not excluded.
        """
        index = self._last_match(directory)
        if index is None or self._rules[index].exception:
            return True
        return any(rule.exception and rule.could_match_below(directory) for rule in self._rules[index + 1 :])

    def _last_match(self, path: str) -> int | None:
        """The index of the last pattern that matches ``path`` or a parent of it, if any."""
        if not self._rules or path in ("", "."):
            return None
        parents = _ancestors(path)
        for index in range(len(self._rules) - 1, -1, -1):
            rule = self._rules[index]
            if rule.matches(path) or any(rule.matches(parent) for parent in parents):
                return index
        return None

    def __repr__(self) -> str:
        return f"IgnoreRules({list(self.patterns)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IgnoreRules) and self.patterns == other.patterns

    def __hash__(self) -> int:
        return hash(self.patterns)
