"""MkDocs hook: publish the benchmark results (plots and JSON) with the site.

They live in ``benchmarks/results/``, where the benchmark scripts write them; the pages link
them as ``benchmarks/results/<name>``, and this adds them to the site under that path so that
strict builds check the links.
"""

import pathlib

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[1]


def on_files(files, config):
    for path in sorted((ROOT / "benchmarks" / "results").glob("*")):
        if path.suffix in {".png", ".json"}:
            files.append(File(f"benchmarks/results/{path.name}", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
