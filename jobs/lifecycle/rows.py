"""Labelled rows from production: every right label (the feedback log and bulk tables, the later
label winning) joined with the prediction it labels, by request id and position.

Only a prediction logged with its text (the endpoint's `monitoring.log_text`) can be trained on; the
others are counted, never silently dropped. A label outside the run's labels is kept in the rows for
the data stage to quarantine (it records each one), and counted here."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from cluster.monitoring import PREDICTION_SCHEMA, PREDICTIONS
from jobs.config import FeedbackTable
from jobs.monitoring.run import KEY, all_feedback, read_log


@dataclass
class LabelledRows:
    """Labelled predictions with their text, and what happened to every label given."""
    rows: pd.DataFrame  # request_id, index, text, label, version, labelled_time
    counts: dict = field(default_factory=dict)

    def notes(self) -> list[str]:
        """One line per kind of label that cannot be trained on, for the job's log."""
        counts, notes = self.counts, []
        if counts["without_text"]:
            notes.append(f"{counts['without_text']} of {counts['matched']} labelled predictions have no logged text "
                         "(monitoring.log_text was off when they were served): without the text a label cannot be "
                         "trained on, so they are left out")
        if counts["unmatched"]:
            notes.append(f"{counts['unmatched']} labels name no logged prediction (a wrong request id, or a log "
                         "removed since): left out")
        if counts["ambiguous"]:
            notes.append(f"{counts['ambiguous']} labels name a request id and position logged twice with different "
                         "texts: left out, as the label's text is unknown")
        if counts["unknown_label"]:
            notes.append(f"{counts['unknown_label']} labels are not among the run's labels: the data stage quarantines them")
        return notes


def labelled_rows(root: str | None, tables: list[FeedbackTable], labels: list[str]) -> LabelledRows:
    """The feedback under `root` (and `tables`) joined with the prediction log under `root`; none without a root.

    `labelled_time` is when the label was given, or for a bulk table's label (no time) when the
    prediction was made. Counts: `feedback` (labels after the later one won), `matched` (naming a
    logged prediction), `unmatched`, `ambiguous` (the same request id and position logged with two
    texts), `without_text`, `unknown_label` (among those with text) and `with_text` (the rows returned)."""
    columns = [*KEY, "text", "label", "version", "labelled_time"]
    if root is None:  # the config requires a root for feedback tables: there is nothing to join them with
        return LabelledRows(pd.DataFrame(columns=columns), dict.fromkeys(
            ("feedback", "matched", "unmatched", "ambiguous", "without_text", "unknown_label", "with_text"), 0))
    feedback = all_feedback(root, tables)
    predictions = read_log(root, PREDICTIONS, PREDICTION_SCHEMA)[[*KEY, "time", "version", "text"]]
    predictions = predictions.astype({"request_id": str, "index": int})
    # A prediction logged twice (a replayed log part) is one prediction; twice with different texts, no one knows which.
    predictions = predictions.drop_duplicates([*KEY, "text"])
    twice = predictions.duplicated(KEY, keep=False)
    ambiguous_keys = predictions.loc[twice, KEY].drop_duplicates().assign(ambiguous=True)
    joined = feedback.merge(predictions[~twice], on=KEY, how="left", suffixes=("", "_predicted")).merge(
        ambiguous_keys, on=KEY, how="left")
    ambiguous = joined["ambiguous"].eq(True)
    matched = joined["version"].notna()
    has_text = matched & joined["text"].notna()
    rows = joined[has_text].assign(labelled_time=lambda frame: frame["time"].fillna(frame["time_predicted"]))[columns]
    counts = {"feedback": int(len(feedback)), "matched": int(matched.sum()), "unmatched": int((~matched & ~ambiguous).sum()),
              "ambiguous": int(ambiguous.sum()), "without_text": int((matched & ~has_text).sum()),
              "unknown_label": int((~rows["label"].isin(labels)).sum()), "with_text": int(len(rows))}
    return LabelledRows(rows.reset_index(drop=True), counts)
