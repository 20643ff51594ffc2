"""The data bench's single-process pandas path: the data job's steps, the rows the job would keep."""

import pandas as pd

from bench.data_bench import pandas_prepare
from jobs.config import DataSection

CSV = """text,sentiment
"Flight was great, thank you!",positive
"flight was GREAT,   thank you!",positive
My bag was lost on the way to Boston and nobody at the desk could help me today,negative
My bag was lost on the way to Boston and nobody at the desk could help me today!!,negative
"",neutral
ok then,maybe
Mail me at jane.doe@example.com about the refund,neutral
The crew on the 6pm flight to Denver was lovely,positive
Delayed three hours with no update at all,negative
Is the lounge open before 5am?,neutral
"""


def test_pandas_path_quarantines_dedups_redacts_and_splits(tmp_path, tiny_model_dir):
    source = tmp_path / "tweets.csv"
    source.write_text(CSV)
    cfg = DataSection(source=str(source))
    counts = pandas_prepare(cfg, tiny_model_dir, tmp_path / "out")

    assert counts["rows_read"] == 10
    assert counts["duplicates_removed"] == 2  # the case/whitespace variant and the near-duplicate
    assert counts["kept"] == 6 == sum(counts["splits"].values())
    quarantine = pd.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert sorted(quarantine["status"]) == ["empty_text", "unknown_label"]
    duplicates = pd.read_parquet(tmp_path / "out" / "duplicates.parquet")
    assert sorted(duplicates["status"]) == ["exact_duplicate", "near_duplicate"]
    kept = pd.concat(pd.read_parquet(tmp_path / "out" / f"{name}.parquet") for name in ("train", "validation", "test"))
    assert len(kept) == 6 and (kept["num_tokens"] > 0).all()
    assert not kept["text"].str.contains("jane.doe@example.com").any()  # redacted before it is written

    limited = pandas_prepare(cfg.model_copy(update={"limit_rows": 4}), tiny_model_dir, tmp_path / "limited")
    assert (limited["rows_read"], limited["kept"]) == (4, 2)
