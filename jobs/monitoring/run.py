"""The monitor run: the prediction and feedback logs read back, cut into time windows per model
version, and each window measured: online quality where feedback labelled its predictions, drift of
its inputs and predictions against the training reference, and the alerts its thresholds raise."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from cluster.monitoring import FEEDBACK, FEEDBACK_SCHEMA, PREDICTION_SCHEMA, PREDICTIONS, utc_now
from cluster.storage import filesystem_for
from cluster.encryption import EncryptionSettings
from jobs.config import FeedbackTable, MonitorConfig, MonitorReference
from jobs.data import shard_encryption
from jobs.monitoring.stats import classification_metrics, ks_test, label_mix_test, psi

KEY = ["request_id", "index"]


def read_log(root: str, kind: str, schema: pa.Schema, start: datetime | None = None,
             end: datetime | None = None) -> pd.DataFrame:
    """One log's records (optionally those timed in [start, end)); empty, with the log's columns, when
    nothing was written yet. The records carry their day and version, so the hive folders are not parsed."""
    filesystem, path = filesystem_for(root)
    folder = f"{path}/{kind}"
    if filesystem.get_file_info(folder).type.name != "Directory":
        return schema.empty_table().to_pandas()
    dataset = pads.dataset(folder, schema=schema, format="parquet", filesystem=filesystem)
    condition = None
    if start is not None:
        condition = (pads.field("time") >= pa.scalar(start, pa.timestamp("us", tz="UTC"))) & (
            pads.field("time") < pa.scalar(end, pa.timestamp("us", tz="UTC")))
    return dataset.to_table(filter=condition).to_pandas()


def read_table(path: str, encryption: EncryptionSettings | None = None, text_columns: list[str] = ()) -> pd.DataFrame:
    """A Parquet file or folder (a run's encrypted shards decrypted with `encryption`), or a CSV file
    (its `text_columns` read as they are, not as numbers)."""
    if path.endswith(".csv"):
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={column: pa.binary() for column in text_columns})).to_pandas()
    return shard_encryption.read_table(path, encryption).to_pandas()


def bulk_feedback(table: FeedbackTable) -> pd.DataFrame:
    # A request id of digits only is an id, not a number ("000...06" is not "6").
    frame = read_table(table.path, text_columns=[table.request_id_column, table.label_column])
    needed = [table.request_id_column, table.label_column, *([table.index_column] if table.index_column else [])]
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise ValueError(f"feedback table {table.path}: no column(s) {missing}; it has {list(frame.columns)}")
    return pd.DataFrame({"request_id": _text(frame[table.request_id_column]),
                         "index": frame[table.index_column].astype(int) if table.index_column else 0,
                         "label": _text(frame[table.label_column])})


def _text(column: pd.Series) -> pd.Series:
    """A column as text; a CSV's text columns are read as bytes, decoded here with U+FFFD for bytes
    that are not UTF-8 (a label no run has, a request id no prediction has) rather than failing."""
    return column.map(lambda value: value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value))


def all_feedback(root: str, tables: list[FeedbackTable]) -> pd.DataFrame:
    """Every right label, one per prediction: the feedback log in time order, then the bulk tables in
    their order; the last label given for a prediction wins (a correction replaces a mistake). `time`
    is when the label was given (the log's), missing for a bulk table's."""
    logged = read_log(root, FEEDBACK, FEEDBACK_SCHEMA).sort_values("time")[[*KEY, "label", "time"]]
    untimed = lambda frame: pd.Series(pd.NaT, index=frame.index, dtype=logged["time"].dtype)  # noqa: E731
    frames = [logged, *(bulk_feedback(table).assign(time=untimed) for table in tables)]
    feedback = pd.concat([frame for frame in frames if len(frame)] or [logged], ignore_index=True)
    feedback = feedback.astype({"request_id": str, "index": int, "label": str})
    return feedback.drop_duplicates(KEY, keep="last")


def window_bounds(cfg: MonitorConfig, now: datetime | None = None) -> list[tuple[datetime, datetime]]:
    """The reported windows, oldest first: `windows` of `window_hours`, the last ending at `end`."""
    width = timedelta(hours=cfg.window_hours)
    if cfg.end is not None:
        end = datetime.fromisoformat(cfg.end)
        end = end if end.tzinfo else end.replace(tzinfo=timezone.utc)
    else:
        seconds = width.total_seconds()
        end = datetime.fromtimestamp(math.ceil((now or utc_now()).timestamp() / seconds) * seconds, timezone.utc)
    return [(end - (cfg.windows - k) * width, end - (cfg.windows - k - 1) * width) for k in range(cfg.windows)]


def load_reference(reference: MonitorReference) -> dict:
    train, test = read_table(reference.train, reference.encryption), read_table(reference.test, reference.encryption)
    for name, frame, column in (("train", train, reference.text_column), ("test", test, reference.label_column)):
        if column not in frame.columns:
            raise ValueError(f"reference.{name} has no column {column!r}; it has {list(frame.columns)}")
    return {"text_chars": train[reference.text_column].astype(str).str.len().to_numpy(),
            "labels": test[reference.label_column].astype(str).to_numpy()}


def measure_window(predictions: pd.DataFrame, feedback: pd.DataFrame, reference: dict | None, labels: list[str],
                   cfg: MonitorConfig) -> dict:
    """One window of one version: counts, quality on its labelled predictions, drift, alerts."""
    limits = cfg.thresholds
    window = {"predictions": int(len(predictions)),
              "label_counts": {label: int(count) for label, count in predictions["label"].value_counts().items()},
              "mean_confidence": float(predictions["confidence"].mean()) if len(predictions) else None,
              "feedback": 0, "quality": None, "drift": None, "alerts": []}
    labelled = predictions.merge(feedback, on=KEY, suffixes=("", "_true"))
    window["feedback"] = int(len(labelled))
    if len(labelled):
        window["quality"] = classification_metrics(labelled["label_true"], labelled["label"], labels,
                                                   bootstrap_samples=cfg.bootstrap_samples, seed=cfg.seed)
    if reference is not None and len(predictions) >= limits.min_predictions:
        length_psi = psi(reference["text_chars"], predictions["text_chars"])
        window["drift"] = {"length_psi": length_psi, "length_ks": ks_test(reference["text_chars"], predictions["text_chars"]),
                           "label_mix": label_mix_test(reference["labels"], predictions["label"], labels)}
        if length_psi > limits.psi and window["drift"]["length_ks"]["pvalue"] < limits.ks_pvalue:
            window["alerts"].append(f"input length drift: PSI {length_psi:.3f} > {limits.psi} "
                                    f"(KS p={window['drift']['length_ks']['pvalue']:.2g})")
        mix = window["drift"]["label_mix"]["pvalue"]
        if mix < limits.label_mix_pvalue:
            window["alerts"].append(f"predicted label mix differs from the test split's (chi-square p={mix:.2g})")
    quality = window["quality"]
    if quality and quality["rows"] >= limits.min_feedback and limits.min_macro_f1 is not None \
            and quality["macro_f1"] < limits.min_macro_f1:
        window["alerts"].append(f"macro-F1 {quality['macro_f1']:.3f} below {limits.min_macro_f1}")
    return window


def run_monitor(cfg: MonitorConfig, now: datetime | None = None) -> dict:
    """Every version's windows, measured (see `measure_window`), with the feedback that matched no
    prediction of the reported windows counted (a wrong request id, or a prediction older than them)."""
    bounds = window_bounds(cfg, now)
    predictions = read_log(cfg.root, PREDICTIONS, PREDICTION_SCHEMA, bounds[0][0], bounds[-1][1])
    feedback = all_feedback(cfg.root, cfg.feedback_tables)[[*KEY, "label"]]
    reference = load_reference(cfg.reference) if cfg.reference is not None else None
    # The models' labels (each prediction's probabilities name them all) and the reference's.
    labels = sorted({label for probabilities in predictions["probabilities"] for label, _ in probabilities}
                    | set(reference["labels"] if reference else ()))
    matched = feedback.merge(predictions[KEY], on=KEY)
    versions = {}
    for version in sorted(predictions["version"].unique()):
        rows = predictions[predictions["version"] == version]
        windows, baseline = [], None
        for start, end in bounds:
            in_window = rows[(rows["time"] >= pd.Timestamp(start)) & (rows["time"] < pd.Timestamp(end))]
            window = {"start": start.isoformat(), "end": end.isoformat(),
                      **measure_window(in_window, feedback, reference, labels, cfg)}
            quality = window["quality"]
            if quality and quality["rows"] >= cfg.thresholds.min_feedback:
                if baseline is None:
                    baseline = window
                elif quality["macro_f1_interval"][1] < baseline["quality"]["macro_f1"] - cfg.thresholds.max_macro_f1_drop:
                    window["alerts"].append(
                        f"macro-F1 {quality['macro_f1']:.3f} (upper bound {quality['macro_f1_interval'][1]:.3f}) dropped "
                        f"from {baseline['quality']['macro_f1']:.3f} in the window from {baseline['start']}")
            windows.append(window)
        versions[version] = windows
    return {"generated": utc_now().isoformat(), "root": cfg.root, "window_hours": cfg.window_hours,
            "thresholds": cfg.thresholds.model_dump(),
            "windows": [[start.isoformat(), end.isoformat()] for start, end in bounds], "labels": labels,
            "reference": None if reference is None else {"train_rows": int(len(reference["text_chars"])),
                                                          "test_rows": int(len(reference["labels"]))},
            "feedback_rows": int(len(feedback)), "feedback_unmatched": int(len(feedback) - len(matched)),
            "versions": versions,
            "alerts": [f"{version} {window['start']}: {alert}" for version, windows in versions.items()
                       for window in windows for alert in window["alerts"]]}
