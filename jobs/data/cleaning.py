"""Validation and cleaning of staged rows: the task's schema checked, texts repaired and
PII-redacted, the language filter applied. A row that fails keeps its reason for the quarantine."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd

from cluster.pii import PII_TYPES
from cluster.prompting import chat_messages
from cluster.text import clean_text
from jobs.config import DataSection
from jobs.data.dedup import dedup_key

# Why a row is set aside. Quarantined: the row itself is broken. Filtered: a sound row the config excludes.
QUARANTINE_REASONS = ("malformed_row", "blank_line", "bad_json", "undecodable", "missing_field", "wrong_type", "empty_text",
                      "unknown_label", "bad_messages", "template_error")
FILTER_REASONS = ("too_short", "too_long", "language")


def validate_record(record: dict, cfg: DataSection) -> tuple[str, list[dict] | None]:
    """Check a record against the task's schema and clean its texts.

    Returns ("ok", messages) -- the conversation the model is trained on, system message first when
    there is one -- or (reason, None)."""
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []  # chats and instructions

    def text_of(field: str) -> tuple[str, str | None]:
        if field not in record:
            return "missing_field", None
        if not isinstance(record[field], str):
            return "wrong_type", None
        text = clean_text(record[field])[0]
        return ("ok", text) if text else ("empty_text", None)

    if cfg.task == "classification":
        status, text = text_of("text")
        if status != "ok":
            return status, None
        label = record.get("label")
        if label is None:
            return "missing_field", None
        if not isinstance(label, str):
            return "wrong_type", None
        label = label.strip().lower()
        if label not in cfg.labels:
            return "unknown_label", None
        return "ok", chat_messages(cfg.system_prompt, text, label)
    if cfg.task == "instruction":
        turns = []
        for field, role in (("prompt", "user"), ("response", "assistant")):
            status, text = text_of(field)
            if status != "ok":
                return status, None
            turns.append({"role": role, "content": text})
        return "ok", system + turns
    messages = record.get("messages")
    if messages is None:
        return "missing_field", None
    if isinstance(messages, str):  # a JSON column in CSV or SQL
        try:
            messages = json.loads(messages)
        except ValueError:
            return "bad_json", None
    if not isinstance(messages, list) or not messages:
        return "wrong_type", None
    turns = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            return "bad_messages", None
        if not isinstance(message.get("content"), str):
            return "wrong_type", None
        text = clean_text(message["content"])[0]
        if not text:
            return "empty_text", None
        turns.append({"role": message["role"], "content": text})
    roles = [turn["role"] for turn in turns]
    if roles[-1] != "assistant" or "user" not in roles or "system" in roles[1:]:
        return "bad_messages", None  # a conversation ends with the answer trained on
    return "ok", (turns if roles[0] == "system" else system + turns)


def example_fields(messages: list[dict], task: str) -> tuple[str, str, str]:
    """(text, label, dedup text) of a conversation: the last user turn, the last answer, and what
    duplicates are judged on (the text for classification, whose label may conflict; else every turn)."""
    text = next(turn["content"] for turn in reversed(messages) if turn["role"] == "user")
    label = messages[-1]["content"]
    if task == "classification":
        return text, label, text
    return text, label, "\x1f".join(turn["content"] for turn in messages if turn["role"] != "system")


def _detect_language(text: str) -> str:
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0  # langdetect samples; a fixed seed gives the same answer every run
    try:
        return detect(text)
    except LangDetectException:  # no letters (a URL, emoji): no language
        return "unknown"


def clean_batch(batch: pd.DataFrame, cfg: DataSection) -> pd.DataFrame:
    """Ray Data UDF: staged rows -> validated, cleaned, PII-redacted examples (bad rows keep their
    reason, and their raw value is redacted too: it is written to the quarantine)."""
    from cluster.pii import Redactor

    redactor = Redactor(cfg.pii)
    status, messages, texts, labels, keys = [], [], [], [], []
    found = {kind: [] for kind in PII_TYPES}
    for record_json, read_status in zip(batch["record"], batch["status"]):
        row_status, conversation = (read_status, None) if read_status != "ok" else validate_record(json.loads(record_json), cfg)
        text = label = key = ""
        counts = Counter()
        for turn in conversation or []:
            if turn["role"] != "system":  # the system prompt is the config's, not data
                turn["content"], turn_counts = redactor.redact(turn["content"])
                counts.update(turn_counts)
        for kind in PII_TYPES:
            found[kind].append(counts[kind])
        if conversation is not None:
            text, label, key_text = example_fields(conversation, cfg.task)
            key = dedup_key(key_text)
            if cfg.languages and _detect_language(text) not in cfg.languages:
                row_status = "language"
        status.append(row_status)
        messages.append(json.dumps(conversation, ensure_ascii=False) if conversation else "")
        texts.append(text)
        labels.append(label)
        keys.append(key)
    out = batch.drop(columns=["record"])
    out["raw"] = [redactor.redact(raw)[0] for raw in out["raw"]]
    out["status"], out["messages"], out["text"], out["label"], out["key"] = status, messages, texts, labels, keys
    for kind, values in found.items():
        out[f"pii_{kind}"] = np.asarray(values, dtype=np.int32)
    out["stratum"] = out["label"] if cfg.task == "classification" else "all"
    return out
