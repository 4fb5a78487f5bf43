"""Check the built documentation site in a real browser (headless Chromium), as a reader sees it.

    python .ci/check_site.py SITE_DIR [--chromium PATH]

* The mathematics page: MathJax (served from the site itself) has typeset its formulas — many
  ``mjx-container`` elements, no TeX left as text, no request for a script outside the site.
* The API page: no raw Sphinx roles (``:class:`…```), every docstring example a code block.

Exits non-zero, naming what failed. ``.ci/run`` runs it after ``mkdocs build --strict``.
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

MIN_TYPESET_FORMULAS = 40  # docs/math.md has well over a hundred
RAW_ROLE = re.compile(r":(?:class|func|meth|data|mod|attr|obj|exc):`")


def rendered_dom(chromium: str, page: Path) -> str:
    """The page's DOM after its scripts ran (MathJax typesets asynchronously: virtual time)."""
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",
            "--virtual-time-budget=20000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if result.returncode != 0 or "<html" not in result.stdout:
        raise SystemExit(f"chromium could not render {page}: {result.stderr[-2000:]}")
    return result.stdout


def _text(dom: str) -> str:
    """The visible text: markup, scripts, styles and typeset math removed."""
    dom = re.sub(r"<(script|style|mjx-container)\b.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", dom))


def check_math(chromium: str, site: Path) -> list[str]:
    dom = rendered_dom(chromium, site / "math" / "index.html")
    problems = []
    typeset = dom.count("<mjx-container")
    if typeset < MIN_TYPESET_FORMULAS:
        problems.append(f"math page: {typeset} typeset formulas (mjx-container), expected at least {MIN_TYPESET_FORMULAS}")
    text = _text(dom)
    leftovers = [m for m in (r"\(", r"\[", "$$", r"\frac", r"\top") if m in text]
    if leftovers:
        problems.append(f"math page: TeX left as text: {leftovers}")
    external = re.findall(r"<script[^>]+src=\"(https?://[^\"]+)\"", dom)
    if external:
        problems.append(f"math page: scripts loaded from outside the site: {external}")
    if "mathjax" not in dom.lower():
        problems.append("math page: MathJax was not loaded")
    return problems


def check_api(chromium: str, site: Path) -> list[str]:
    dom = rendered_dom(chromium, site / "api" / "index.html")
    problems = []
    roles = RAW_ROLE.findall(_text(dom))
    if roles:
        problems.append(f"API page: {len(roles)} raw Sphinx roles, e.g. {roles[:3]}")
    code_blocks = re.findall(r"<code[^>]*>(.*?)</code>", dom, flags=re.S)
    examples = [c for c in code_blocks if "&gt;&gt;&gt;" in c or ">>>" in c]
    if not examples:
        problems.append("API page: no docstring example rendered as a code block")
    prose = re.sub(r"<(pre|code)\b.*?</\1>", " ", dom, flags=re.S)
    if "&gt;&gt;&gt;" in prose:
        problems.append("API page: a docstring example (>>>) is rendered as prose, not code")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--chromium", default=None)
    args = parser.parse_args()
    chromium = args.chromium or next(
        (c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None
    )
    if chromium is None:
        print("no Chromium found (install it: apt-get install -y chromium)", file=sys.stderr)
        return 2
    problems = check_math(chromium, args.site) + check_api(chromium, args.site)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"site checked in {chromium}: formulas typeset, API page clean")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
