"""Text repair and the preprocessing a model's input goes through, in training and at serving.

`clean_text` is what data preparation does to every text it reads; `Preprocessor` applies a model
folder's recorded preprocessing (cleaning, then its PII rules) to text arriving at `/v1/classify` or
batch inference, so the model sees at serving what it saw in training.
"""

from __future__ import annotations

import os
import re

from pydantic import SecretStr

from cluster.contracts import TextPreprocessing
from cluster.pii import PiiSettings, Redactor

# The PII hash salt is a secret: a model folder records only its fingerprint, and serving takes
# the salt itself from this variable (checked against the fingerprint).
HASH_SALT_ENV = "LAKEFORGE_PII_HASH_SALT"

# Runs of non-ASCII characters and underscores: what double-encoded smart quotes and dashes
# became in the tweet corpus ("don’¢_äŒ_Ü¢t", "cars_—_.no"). Valid UTF-8 text is only scrubbed of
# replacement characters; text that was not valid UTF-8 has every non-ASCII run collapsed.
_REPLACEMENT_RUN = re.compile(r"[_\ufffd]*\ufffd[_\ufffd]*")
_NON_ASCII_RUN = re.compile(r"[_\u0080-\U0010ffff]*[\u0080-\U0010ffff][_\u0080-\U0010ffff]*")
_TYPOGRAPHIC = {"’": "'", "‘": "'", "“": '"', "”": '"', "—": " - ", "–": " - ", "…": "..."}
_WHITESPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _collapse_junk_run(match: re.Match) -> str:
    for char in match.group(0):
        if char in _TYPOGRAPHIC:
            return _TYPOGRAPHIC[char]
    return " "


def decode_text(raw: bytes, invalid_utf8: str = "repair") -> tuple[str | None, bool]:
    """Bytes -> text, and whether they were not valid UTF-8. None when they are not and the policy
    is 'quarantine'."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        if invalid_utf8 == "quarantine":
            return None, False
        # Mac Roman maps the corpus's stray lead bytes to the punctuation that was meant
        # (0xD5 -> ’, 0xD1 -> —) and never fails; the junk runs are collapsed before ftfy,
        # which would otherwise re-interpret parts of them.
        return _NON_ASCII_RUN.sub(_collapse_junk_run, raw.decode("mac_roman")), True


def clean_text(raw: bytes | str | None) -> tuple[str, bool]:
    """Repair encoding, HTML entities, control characters and whitespace.

    Returns the clean text and whether the input was not valid UTF-8 (counted as repaired).
    """
    import ftfy

    if raw is None:
        return "", False
    text, repaired = decode_text(raw) if isinstance(raw, bytes) else (raw, False)
    text = ftfy.fix_text(text)  # mojibake that is still valid UTF-8, HTML entities (&amp;)
    text = _REPLACEMENT_RUN.sub(" ", text)
    text = _CONTROL.sub(" ", text)
    return _WHITESPACE.sub(" ", text).strip(), repaired


class Preprocessor:
    """A model folder's `TextPreprocessing` as a function of text: clean, then redact PII."""

    def __init__(self, settings: TextPreprocessing):
        self.clean = settings.clean
        pii = settings.pii
        hashed = [kind for kind, action in pii.actions.model_dump().items() if action == "hash"] if pii else []
        if hashed:
            pii = _with_training_salt(pii, hashed)
        self.redactor = Redactor(pii) if pii is not None and pii.enabled else None

    def __call__(self, text: str) -> str:
        if self.clean:
            text = clean_text(text)[0]
        return self.redactor.redact(text)[0] if self.redactor else text


def _with_training_salt(pii: PiiSettings, hashed: list[str]) -> PiiSettings:
    """The PII rules with the hash salt the model was trained with: from $LAKEFORGE_PII_HASH_SALT,
    which must match the fingerprint the model folder recorded (a different salt would hash PII to
    tokens the model never saw)."""
    salt = os.environ.get(HASH_SALT_ENV, "")
    if not salt:
        raise ValueError(f"the model's PII rules hash {hashed}: set {HASH_SALT_ENV} to the data.pii.hash_salt "
                         f"it was trained with")
    recorded = pii.hash_salt.get_secret_value()
    salted = pii.model_copy(update={"hash_salt": SecretStr(salt)})
    fingerprint = salted.model_dump(mode="json")["hash_salt"]
    if recorded not in (fingerprint, salt):  # read from a model folder, or settings still in memory
        raise ValueError(f"{HASH_SALT_ENV} is not the PII hash salt this model was trained with "
                         f"(fingerprint {fingerprint}, the model folder records {recorded})")
    return salted
