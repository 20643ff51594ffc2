"""scripts/chitchat_to_jsonl.py, the converter behind configs/chitchat.yaml's data, on hand-made input
in the chitchat-dataset package's format (its dataset.json): turns, windows, roles, bad input."""

from __future__ import annotations

import json
import sys

import pytest

from scripts.chitchat_to_jsonl import main

ANN, BOB = "sender-ann", "sender-bob"


def group(sender: str, *texts: str) -> list[dict]:
    """One message group as the package stores it: consecutive messages of one sender."""
    return [{"text": text, "timestamp": "2018-05-02T19:38:15Z", "sender": sender} for text in texts]


CONVERSATIONS = {
    # Listed out of id order: the output is in id order.
    "c2": {"messages": [group(BOB, "Anyone there?")], "prompt": "Only the opener speaks: no answer, no example."},
    "c1": {"ratings": {"witty": 3}, "messages": [
        group(ANN, "Hello", " How are you? "),
        group(BOB, "Fine,", "thanks."),
        group(BOB, "And you?"),            # the same sender again: the same turn
        group(ANN, "   ", ""),               # no text at all: no turn
        group(ANN, "Tired."),
        group(BOB, ""),                      # an empty answer is never an example
        group(ANN, "Big day?"),
        group(BOB, "Yes, a long one."),
    ]},
}


def convert(tmp_path, conversations, *args: str) -> list[dict]:
    source, output = tmp_path / "dataset.json", tmp_path / "out" / "chitchat.jsonl"
    source.write_text(json.dumps(conversations), encoding="utf-8")
    main([str(output), "--input", str(source), *args])
    return [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]


def test_every_answer_is_an_assistant_turn_after_up_to_n_turns_that_start_with_the_user(tmp_path, capsys):
    rows = convert(tmp_path, CONVERSATIONS, "--context-turns", "2")
    assert "2 examples written" in capsys.readouterr().out
    user, assistant = "user", "assistant"
    assert rows == [
        {"conversation": "c1", "messages": [
            {"role": user, "content": "Hello How are you?"},
            {"role": assistant, "content": "Fine, thanks. And you?"}]},
        # Two turns before the answer would start at an assistant turn: the window starts at the user's.
        {"conversation": "c1", "messages": [
            {"role": user, "content": "Tired. Big day?"},
            {"role": assistant, "content": "Yes, a long one."}]},
    ]
    wider = convert(tmp_path, CONVERSATIONS, "--context-turns", "3")
    assert [len(row["messages"]) for row in wider] == [2, 4] and wider[1]["messages"][0]["content"] == "Hello How are you?"
    for row in rows + wider:
        roles = [message["role"] for message in row["messages"]]
        assert roles[0] == user and roles[-1] == assistant and all(a != b for a, b in zip(roles, roles[1:]))
        assert all(message["content"].strip() for message in row["messages"])


@pytest.mark.parametrize("content, error", [
    (b'{"c1": {"messages": [[{"text": "caf\xe9", "sender": "a"}]]}}', "is not UTF-8 text (byte 35: invalid continuation byte)"),
    (b'{"c1": ', "is not JSON"),
    (b'[{"messages": []}]', "should hold an object of conversations by id, got a JSON list"),
    (b'{"c1": {"ratings": {}}}', "conversation c1: it has no 'messages'"),
    (b'{"c1": {"messages": [[{"text": "hi", "sender": "a"}], [{"text": "no sender"}]]}}',
     "conversation c1: message group 1 should be a non-empty list of messages with a text and a sender"),
    (b'{"c1": {"messages": [[]]}}', "conversation c1: message group 0 should be a non-empty list"),
])
def test_bad_input_stops_with_a_message_naming_the_problem_and_writes_nothing(tmp_path, content, error):
    source, output = tmp_path / "dataset.json", tmp_path / "chitchat.jsonl"
    source.write_bytes(content)
    with pytest.raises(SystemExit) as stopped:
        main([str(output), "--input", str(source)])
    assert str(stopped.value).startswith("chitchat_to_jsonl: ") and error in str(stopped.value)
    assert not output.exists()


def test_without_the_package_or_an_input_file_it_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "chitchat_dataset", None)  # importing it raises ModuleNotFoundError
    with pytest.raises(SystemExit, match="pip install chitchat-dataset==0.9.0"):
        main([str(tmp_path / "chitchat.jsonl")])
    with pytest.raises(SystemExit):  # argparse's own error: a window without the turn it answers
        main([str(tmp_path / "chitchat.jsonl"), "--context-turns", "0"])
