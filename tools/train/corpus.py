"""Rebuild the training corpus byte for byte from installed Debian documentation packages.

Sources (see CORPUS.md for versions, sizes and licences):

- ``python3.11-doc`` (pulled in by ``python3-doc``): the Python 3.11 documentation, PSF License v2;
- ``python-django-doc``: the Django 3.2 documentation, BSD-3-Clause.

Both ship Sphinx HTML.  Each HTML page is one *document*.  From a page only the main content is read
(Python: ``<div role="main">``; Django: ``<div class="yui-g">``), and inside it these subtrees are dropped:
``pre``, ``table``, ``script``, ``style``, any ``div`` whose class names a code block (``highlight*``), a table of
contents (``toctree-wrapper``, ``contents``, ``topic``) or navigation (``related``, ``sphinxsidebar``, ``footer``,
``nav``), API signatures (``dt`` with class ``sig``), and the pilcrow links (``a.headerlink``).  Block elements
end a paragraph; whitespace inside a paragraph is collapsed to single spaces; paragraphs with fewer than 4 words
or in which letters are under 60% of the non-space characters are dropped (code left outside ``pre``, lists of
symbols); documents with fewer than 200 characters are dropped.  Whole pages excluded by name: the indexes
(``genindex*``, ``py-modindex``), ``search``, ``contents``, Python's ``whatsnew/changelog`` (a list of issue
numbers), and everything under a ``_`` directory (``_sources``, ``_modules`` = source code, ``_static``).

Output format: UTF-8 text, a document's paragraphs separated by one ``\\n``, documents separated by ``\\n\\n``
(paragraphs are never empty, so the split is unambiguous), a final ``\\n``.  Documents are ordered by
(source, relative path) in byte order of the path.  Document ``i`` (0-based, in that order) goes to the
held-out split when ``i % HELDOUT_EVERY == HELDOUT_AT``; training never sees those.

Usage: ``python tools/train/corpus.py --out DIR`` writes ``DIR/train.txt``, ``DIR/heldout.txt``,
``DIR/manifest.json`` (per source: package, version, files, bytes; per split: documents, bytes, SHA-256) and
``DIR/SHA256SUMS``.  ``--check`` compares the hashes against the ones recorded in this file's ``EXPECTED``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

HELDOUT_EVERY = 20
HELDOUT_AT = 10
MIN_WORDS = 4
MIN_LETTER_SHARE = 0.6
MIN_DOC_CHARS = 200

# From python3.11-doc 3.11.2-6+deb12u9 and python-django-doc 3:3.2.25-0+deb12u7 (CORPUS.md); --check compares.
EXPECTED: dict[str, str] = {
    "train": "cd8c94b06ef44b2a411af585fce2a865a21a3a472d5bfd8bf839b97898efb58d",
    "heldout": "ed00c95f595bea337ecf811153041cbff773a9399362553ba51d88a8ebf83f14",
}


@dataclass(frozen=True)
class Source:
    name: str
    package: str
    root: str
    main_attr: tuple[str, str]  # (attribute, value-or-class) that marks the main content div
    exclude: tuple[str, ...]


SOURCES = (
    Source(
        name="python-3.11-docs",
        package="python3.11-doc",
        root="/usr/share/doc/python3.11/html",
        main_attr=("role", "main"),
        exclude=("genindex", "py-modindex.html", "search.html", "contents.html", "whatsnew/changelog"),
    ),
    Source(
        name="django-3.2-docs",
        package="python-django-doc",
        root="/usr/share/doc/python-django-doc/html",
        main_attr=("class", "yui-g"),
        exclude=("genindex", "py-modindex.html", "search.html", "contents.html"),
    ),
)

SKIP_TAGS = {"pre", "table", "script", "style", "nav", "head"}
SKIP_DIV_CLASSES = {
    "toctree-wrapper", "contents", "topic", "related", "sphinxsidebar", "footer", "nav", "sidebar",
}
BLOCK_TAGS = {
    "p", "div", "section", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
    "blockquote", "br", "hr", "figure", "figcaption", "caption", "article", "aside",
}
VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"}
_WS = re.compile(r"\s+")


def _skip(tag: str, attrs: dict[str, str]) -> bool:
    if tag in SKIP_TAGS:
        return True
    classes = set((attrs.get("class") or "").split())
    if tag == "div" and (classes & SKIP_DIV_CLASSES or any(c.startswith("highlight") for c in classes)):
        return True
    if tag == "dt" and "sig" in classes:
        return True
    return tag == "a" and "headerlink" in classes


class _Extractor(HTMLParser):
    """Collects the paragraphs of the main content of one Sphinx page."""

    def __init__(self, main_attr: tuple[str, str]) -> None:
        super().__init__(convert_charrefs=True)
        self.main_attr = main_attr
        self.stack: list[str] = []  # open tags (void tags never pushed)
        self.main_depth: int | None = None  # stack depth at which the main div opened
        self.skip_depth: int | None = None  # stack depth at which a skipped subtree opened
        self.paragraphs: list[str] = []
        self.buf: list[str] = []

    def _flush(self) -> None:
        text = _WS.sub(" ", "".join(self.buf)).strip()
        self.buf = []
        if text:
            self.paragraphs.append(text)

    def _is_main(self, tag: str, attrs: dict[str, str]) -> bool:
        key, value = self.main_attr
        if tag != "div":
            return False
        if key == "class":
            return value in (attrs.get("class") or "").split()
        return attrs.get(key) == value

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: (v or "") for k, v in attrs_list}
        if tag in VOID_TAGS:
            if tag in BLOCK_TAGS and self.main_depth is not None and self.skip_depth is None:
                self._flush()
            return
        self.stack.append(tag)
        depth = len(self.stack)
        if self.main_depth is None:
            if self._is_main(tag, attrs):
                self.main_depth = depth
            return
        if self.skip_depth is None:
            if tag in BLOCK_TAGS:
                self._flush()
            if _skip(tag, attrs):
                self.skip_depth = depth

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_TAGS or tag not in self.stack:
            return
        # pop up to and including the innermost matching tag (tolerates unclosed <p>, <li>)
        while self.stack:
            depth = len(self.stack)
            top = self.stack.pop()
            if self.skip_depth is not None and depth <= self.skip_depth:
                self.skip_depth = None
            if self.main_depth is not None and depth <= self.main_depth:
                self._flush()
                self.main_depth = -1  # main content closed: ignore the rest of the page
            if top == tag:
                break
        if self.main_depth is not None and self.main_depth > 0 and tag in BLOCK_TAGS and self.skip_depth is None:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self.main_depth is not None and self.main_depth > 0 and self.skip_depth is None:
            self.buf.append(data)


def _keep(paragraph: str) -> bool:
    if len(paragraph.split()) < MIN_WORDS:
        return False
    chars = [c for c in paragraph if not c.isspace()]
    letters = sum(c.isalpha() for c in chars)
    return letters >= MIN_LETTER_SHARE * len(chars)


def extract(html: str, main_attr: tuple[str, str]) -> str:
    """The kept paragraphs of one page, joined by newlines ('' when nothing is kept)."""
    parser = _Extractor(main_attr)
    parser.feed(html)
    parser.close()
    parser._flush()
    return "\n".join(p for p in parser.paragraphs if _keep(p))


def _excluded(rel: str, source: Source) -> bool:
    if any(part.startswith("_") for part in rel.split("/")[:-1]):
        return True
    return any(rel.startswith(e) or rel.split("/")[-1].startswith(e) for e in source.exclude)


def package_version(package: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "not installed"
    return out.stdout.strip()


def documents(source: Source) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(relative path, text) for each kept page of a source, in byte order of the path; and file counts."""
    root = Path(source.root)
    if not root.is_dir():
        raise SystemExit(f"{root} missing: apt-get install -y {source.package}")
    paths = sorted((p for p in root.rglob("*.html") if p.is_file()), key=lambda p: p.relative_to(root).as_posix().encode())
    stats = {"html_files": 0, "html_bytes": 0, "excluded_files": 0, "empty_files": 0}
    docs = []
    for path in paths:
        rel = path.relative_to(root).as_posix()
        stats["html_files"] += 1
        if _excluded(rel, source):
            stats["excluded_files"] += 1
            continue
        raw = path.read_bytes()
        stats["html_bytes"] += len(raw)
        text = extract(raw.decode("utf-8"), source.main_attr)
        if len(text) < MIN_DOC_CHARS:
            stats["empty_files"] += 1
            continue
        docs.append((rel, text))
    return docs, stats


def build(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"sources": [], "heldout_rule": f"document index % {HELDOUT_EVERY} == {HELDOUT_AT}"}
    splits: dict[str, list[str]] = {"train": [], "heldout": []}
    heldout_names: list[str] = []
    index = 0
    for source in SOURCES:
        docs, stats = documents(source)
        text_bytes = sum(len(t.encode()) for _, t in docs)
        manifest["sources"].append(
            {"name": source.name, "package": source.package, "version": package_version(source.package),
             "root": source.root, "documents": len(docs), "text_bytes": text_bytes, **stats}
        )
        for rel, text in docs:
            if index % HELDOUT_EVERY == HELDOUT_AT:
                splits["heldout"].append(text)
                heldout_names.append(f"{source.name}/{rel}")
            else:
                splits["train"].append(text)
            index += 1
    sums = []
    for split, texts in splits.items():
        data = ("\n\n".join(texts) + "\n").encode("utf-8")
        (out / f"{split}.txt").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        sums.append(f"{digest}  {split}.txt")
        manifest[split] = {"documents": len(texts), "bytes": len(data), "sha256": digest}
    manifest["heldout_documents"] = heldout_names
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("tools/train/data"))
    ap.add_argument("--check", action="store_true", help="fail unless the SHA-256s match EXPECTED")
    args = ap.parse_args(argv)
    manifest = build(args.out)
    for src in manifest["sources"]:
        print(f"{src['package']} {src['version']}: {src['documents']} documents, {src['text_bytes']:,} bytes of text"
              f" from {src['html_files']} HTML files")
    for split in ("train", "heldout"):
        m = manifest[split]
        print(f"{split}: {m['documents']} documents, {m['bytes']:,} bytes, sha256 {m['sha256']}")
    if args.check and EXPECTED:
        bad = [s for s in ("train", "heldout") if EXPECTED.get(s) != manifest[s]["sha256"]]
        if bad:
            print(f"SHA-256 mismatch for {', '.join(bad)}", file=sys.stderr)
            return 1
        print("SHA-256 matches EXPECTED")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
