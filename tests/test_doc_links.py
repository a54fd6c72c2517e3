"""Every link of the README and of docs/*.md resolves: a relative link names a file or folder of
the repository (an image too), a `#fragment` names a heading of its target page, and a file path
quoted in backticks (`docs/x.md`, `megatron_tsp/tsp/mlp.py`, ...) exists. The README lists every
public name of the package."""

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP = ("docs", "configs", "scripts", "tests", "megatron_tsp", "benchmarks", "patches")
# quoted paths of a page's record of an older commit, which that commit had
HISTORICAL = {("docs/validation.md", "tests/distributed"): "the multi-process tests' folder at commit ea8befd"}


def pages():
    docs = sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md"))
    return ["README.md"] + docs


def prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    return re.sub(r"(?ms)^```.*?^```", "", text)


def anchors(path: str):
    """GitHub's heading ids of a markdown file: lower case, punctuation dropped, spaces -> '-',
    a repeated id suffixed -1, -2, ..."""
    seen, out = {}, set()
    for heading in re.findall(r"(?m)^#{1,6} +(.+?) *#*$", prose(open(path).read())):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: str):
    """(target, fragment) of every markdown link and image of `page` outside code."""
    text = re.sub(r"`[^`\n]*`", "", prose(open(os.path.join(REPO, page)).read()))
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?: \"[^\"]*\")?\)", text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, fragment = target.partition("#")
        yield path, fragment


def broken_links(page: str):
    bad = []
    here = os.path.dirname(os.path.join(REPO, page))
    for path, fragment in links(page):
        full = os.path.normpath(os.path.join(here, path)) if path else os.path.join(REPO, page)
        if not os.path.exists(full):
            bad.append(f"{page}: link to {path} (no such file)")
        elif fragment and full.endswith(".md") and fragment not in anchors(full):
            bad.append(f"{page}: link to {path}#{fragment} (no such heading)")
    return bad


def broken_paths(page: str):
    """Repository paths quoted in backticks that do not exist (placeholders like <tag>, $VAR,
    *, {a,b} or an upper-case NAME are not paths)."""
    bad = []
    for path in re.findall(r"`((?:%s)/[\w./-]*)`" % "|".join(TOP), open(os.path.join(REPO, page)).read()):
        placeholder = any(re.fullmatch(r"[A-Z_]+", part.split(".")[0]) for part in path.split("/"))
        if (not placeholder and (page, path) not in HISTORICAL
                and not os.path.exists(os.path.join(REPO, path.rstrip(".")))):
            bad.append(f"{page}: `{path}` (no such file)")
    return bad


@pytest.mark.parametrize("page", pages())
def test_every_link_resolves(page):
    assert broken_links(page) + broken_paths(page) == []


def test_the_link_check_catches_a_broken_link(tmp_path, monkeypatch):
    """Test the test: a missing file, a missing heading and a missing quoted path are reported."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its part\n")
    (tmp_path / "README.md").write_text("[ok](docs/a.md#its-part) [gone](docs/b.md) [bad](docs/a.md#nothing)\n"
                                        "`docs/a.md` `docs/c.md` ![img](docs/x.png)\n```\n[in code](nowhere.md)\n```\n")
    monkeypatch.setitem(globals(), "REPO", str(tmp_path))
    assert broken_links("README.md") == ["README.md: link to docs/b.md (no such file)",
                                         "README.md: link to docs/a.md#nothing (no such heading)",
                                         "README.md: link to docs/x.png (no such file)"]
    assert broken_paths("README.md") == ["README.md: `docs/c.md` (no such file)"]


def test_readme_lists_every_public_name():
    import megatron_tsp

    readme = open(os.path.join(REPO, "README.md")).read()
    assert [n for n in megatron_tsp.__all__ if f"`{n}`" not in readme] == []


def test_old_names_import_with_a_deprecation_warning():
    """TSPRingMLP (TSPMLP's name until issue 29) still imports, from the package and its module,
    as TSPMLP itself with a DeprecationWarning; it is not a public name any more."""
    import megatron_tsp
    from megatron_tsp.tsp.mlp import TSPMLP

    with pytest.warns(DeprecationWarning, match="TSPRingMLP is deprecated: it is TSPMLP"):
        from megatron_tsp import TSPRingMLP
    assert TSPRingMLP is TSPMLP
    with pytest.warns(DeprecationWarning, match="TSPRingMLP is deprecated"):
        from megatron_tsp.tsp.mlp import TSPRingMLP as old
    assert old is TSPMLP
    assert "TSPMLP" in megatron_tsp.__all__ and "TSPRingMLP" not in megatron_tsp.__all__
    with pytest.raises(AttributeError):
        megatron_tsp.tsp.mlp.TSPNoSuchMLP
