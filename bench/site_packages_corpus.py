"""A larger real-text corpus for convergence runs: the docstrings of every installed package (the
same pydoc-like layout as the embedded demo corpus, `llamatron/data/corpus.py`), in C4's format.

    python bench/site_packages_corpus.py OUT_DIR      # then: llamatron preprocess --input OUT_DIR/*.json.gz ...

The demo corpus (~0.5M tokens) repeats every few hundred steps at the sizes a convergence comparison
needs; this one is ~20x larger on a machine with torch, transformers and numpy installed. A document
goes to validation by the same stable hash of its title as the demo corpus.
"""

import sys
import sysconfig
from pathlib import Path

from llamatron.data.corpus import TIMESTAMP, _write_jsonl_gz, in_validation, module_docs


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["purelib"])
    train, valid = [], []
    for module, text in module_docs(root):
        doc = {"text": text, "timestamp": TIMESTAMP, "url": f"site-packages/{module}"}
        (valid if in_validation(module, 0.02) else train).append(doc)
    _write_jsonl_gz(out / "c4-train.00000-of-00001.json.gz", train)
    _write_jsonl_gz(out / "c4-validation.00000-of-00001.json.gz", valid)
    chars = sum(len(d["text"]) for d in train)
    print(f"{len(train)} train documents ({chars / 1e6:.1f}M characters), {len(valid)} validation documents under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
