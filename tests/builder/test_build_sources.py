"""Source selection for COPY and ADD (no VM): paths resolve beneath their tree whatever the links in
it say, .dockerignore hides files, and the cache digest follows content, modes and owners."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from supermachine.build.ignore import IgnoreRules
from supermachine.build.sources import CopyPlan, SourceError, SourceTree, plan_copy


@pytest.fixture
def tree(tmp_path: Path) -> SourceTree:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("image passwd\n")
    (root / "app/sub").mkdir(parents=True)
    (root / "app/a.txt").write_text("a\n")
    (root / "app/b.log").write_text("b\n")
    (root / "app/sub/c.txt").write_text("c\n")
    os.symlink("../../../../../../etc/passwd", root / "app/climb")
    os.symlink("/etc/passwd", root / "app/absolute")
    os.symlink("loop2", root / "app/loop1")
    os.symlink("loop1", root / "app/loop2")
    os.symlink("/", root / "app/rootlink")
    return SourceTree(root, "the test tree", IgnoreRules.parse("*/*.log\n"))


@pytest.mark.parametrize(
    "link", ["app/climb", "app/absolute", "app/rootlink/etc/passwd", "app/../../etc/passwd"]
)
def test_links_and_dots_resolve_inside_the_tree(tree: SourceTree, link: str) -> None:
    found = tree.resolve(link)
    assert found is not None and found[0] == "etc/passwd"
    assert (tree.root / found[0]).read_text() == "image passwd\n"


def test_a_link_loop_is_an_error(tree: SourceTree) -> None:
    with pytest.raises(SourceError, match="too many symbolic links"):
        tree.resolve("app/loop1")


def test_select_globs_and_ignores(tree: SourceTree) -> None:
    assert tree.select("app/*.txt", "Dockerfile:3") == ["app/a.txt"]
    with pytest.raises(SourceError, match=r"Dockerfile:3: 'app/b\.log' does not exist"):
        tree.select("app/b.log", "Dockerfile:3")
    with pytest.raises(SourceError, match="no file in the test tree matches"):
        tree.select("app/*.zip", "Dockerfile:3")
    walked = [rel for rel, _ in tree.walk("app")]
    assert "app/b.log" not in walked and "app/sub/c.txt" in walked
    assert walked.index("app/sub") < walked.index("app/sub/c.txt")


def test_the_digest_follows_content_modes_and_owners(tree: SourceTree) -> None:
    def digest(owner: tuple[int, int] | None = None) -> str:
        plan = CopyPlan()
        rel, st = tree.resolve("app") or ("", os.lstat(tree.root))
        plan_copy(plan, tree, rel, st, "/dest", owner=owner, chmod=None, dest_exists_as_dir=False)
        return plan.digest()

    first = digest()
    assert digest() == first
    os.utime(tree.root / "app/a.txt", (1, 1))
    assert digest() == first  # times are not content
    assert digest((1, 1)) != first
    os.chmod(tree.root / "app/a.txt", 0o600)
    assert digest() != first
    os.chmod(tree.root / "app/a.txt", 0o644)
    (tree.root / "app/a.txt").write_text("A\n")
    assert digest() != first
