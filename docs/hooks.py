"""MkDocs hook: publish the benchmark results and the MathJax renderer with the site.

* The benchmark results (plots and JSON) live in ``benchmarks/results/``, where the benchmark
  scripts write them; the pages link them as ``benchmarks/results/<name>``, and this adds them
  to the site under that path so that strict builds check the links.
* The mathematics is typeset by MathJax 3 served from the site itself (no CDN: the pages work
  offline and from ``file://``). Its files come from the ``django-static-mathjax`` wheel (in the
  ``docs`` extra; despite the name it is a plain copy of MathJax's files, with no Django
  dependency), and this adds the part that ``tex-chtml.js`` needs to the site under
  ``assets/mathjax/``: the combined component, the CHTML fonts it loads, the TeX extensions it
  loads on demand (``autoload``) and the licence.
"""

import importlib.resources
import pathlib

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[1]

MATHJAX_DEST = "assets/mathjax"
# Relative to the package's MathJax tree (``mathjax/static/mathjax/``): (glob, under es5/?).
MATHJAX_FILES = [
    ("tex-chtml.js", True),
    ("output/chtml/fonts/woff-v2/*.woff", True),
    ("input/tex/extensions/*.js", True),
    ("LICENSE", False),
]


def _mathjax_root():
    missing = (
        "the documentation typesets its mathematics with MathJax from the `django-static-mathjax` "
        "package, which is not installed: pip install -e '.[docs]'"
    )
    try:
        root = pathlib.Path(str(importlib.resources.files("mathjax"))) / "static" / "mathjax"
    except ModuleNotFoundError:
        raise PluginError(missing) from None
    if not (root / "es5" / "tex-chtml.js").is_file():
        raise PluginError(f"{missing} (a `mathjax` package was found, but {root}/es5/tex-chtml.js is not there)")
    return root


def on_files(files, config):
    for path in sorted((ROOT / "benchmarks" / "results").glob("*")):
        if path.suffix in {".png", ".json"}:
            files.append(File(f"benchmarks/results/{path.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))

    root = _mathjax_root()
    for pattern, in_es5 in MATHJAX_FILES:
        base = root / "es5" if in_es5 else root
        paths = sorted(base.glob(pattern))
        if not paths:
            raise PluginError(f"MathJax file(s) {pattern} not found under {base}: reinstall django-static-mathjax")
        for path in paths:
            uri = f"{MATHJAX_DEST}/{path.relative_to(base).as_posix()}"
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
