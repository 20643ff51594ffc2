"""Chat rows for configs/chitchat.yaml from the Chit-Chat Challenge dataset (BYU PCC lab, MIT licence),
which the `chitchat-dataset` package ships (about 7,000 open-domain conversations between people).

    pip install chitchat-dataset==0.9.0      # the `chitchat` extra: pip install -e .[chitchat]
    python scripts/chitchat_to_jsonl.py data/chitchat.jsonl

Each conversation's consecutive messages by one sender are one turn; the person who opened it is the
user, the other the assistant. Every assistant turn ends one example, {"messages": [...]}: up to
`--context-turns` turns before it (starting with a user turn) and the turn itself, so the loss is on
its assistant turns and the evaluation generates the final one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

INSTALL_HINT = "pip install chitchat-dataset==0.9.0"


def conversation_turns(messages: list[list[dict]]) -> list[dict]:
    """The dataset's message groups as {role, content} turns: a group's texts joined by spaces, groups
    by the same sender merged, the opener as the user. Messages with no text are left out, so no turn
    (and no answer) is empty."""
    turns: list[dict] = []
    senders: list[str] = []
    if not isinstance(messages, list):
        raise ValueError(f"'messages' should be a list of message groups, got {type(messages).__name__}")
    for position, group in enumerate(messages):
        if not (isinstance(group, list) and group and all(
                isinstance(message, dict) and isinstance(message.get("text"), str) and isinstance(message.get("sender"), str)
                for message in group)):
            raise ValueError(f"message group {position} should be a non-empty list of messages with a text and a "
                             f"sender, got {json.dumps(group)[:80]}")
        text = " ".join(message["text"].strip() for message in group if message["text"].strip())
        if not text:
            continue
        sender = group[0]["sender"]
        if senders and senders[-1] == sender:
            turns[-1]["content"] += " " + text
            continue
        senders.append(sender)
        turns.append({"role": "user" if sender == senders[0] else "assistant", "content": text})
    return turns


def examples(turns: list[dict], context_turns: int) -> list[list[dict]]:
    """One example per assistant turn: it and up to `context_turns` turns before it, from a user turn on."""
    out = []
    for end, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = max(0, end - context_turns)
        if turns[start]["role"] != "user":
            start += 1
        out.append(turns[start:end + 1])
    return out


def read_conversations(path: Path) -> dict[str, dict]:
    """The package's dataset.json: {conversation id: {"messages": [[{"text", "sender", ...}, ...], ...], ...}}."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); the dataset's file is UTF-8 JSON") from error
    try:
        conversations = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from error
    if not isinstance(conversations, dict):
        raise ValueError(f"{path} should hold an object of conversations by id, got a JSON {type(conversations).__name__}")
    return conversations


def chat_rows(conversations: dict[str, dict], context_turns: int) -> list[dict]:
    """Every example of every conversation, in conversation-id order: {"conversation", "messages"}."""
    rows = []
    for conversation_id, conversation in sorted(conversations.items()):
        try:
            if not isinstance(conversation, dict) or "messages" not in conversation:
                raise ValueError("it has no 'messages'")
            turns = conversation_turns(conversation["messages"])
        except ValueError as error:
            raise ValueError(f"conversation {conversation_id}: {error}") from None
        rows += [{"conversation": conversation_id, "messages": messages} for messages in examples(turns, context_turns)]
    return rows


def packaged_dataset() -> Path:
    """The dataset.json the chitchat-dataset package ships."""
    from importlib.resources import files

    try:
        return Path(str(files("chitchat_dataset") / "dataset.json"))
    except ModuleNotFoundError:
        raise SystemExit(f"chitchat_to_jsonl: the dataset ships in the chitchat-dataset package: {INSTALL_HINT}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="JSONL file to write")
    parser.add_argument("--context-turns", type=int, default=3, help="turns before the answer kept as its context (default 3)")
    parser.add_argument("--input", type=Path, default=None,
                        help="the dataset's JSON file (default: the one the chitchat-dataset package ships)")
    args = parser.parse_args(argv)
    if args.context_turns < 1:
        parser.error("--context-turns must be at least 1 (an answer needs the turn it answers)")
    source = args.input or packaged_dataset()
    try:
        rows = chat_rows(read_conversations(source), args.context_turns)
    except (OSError, ValueError) as error:
        raise SystemExit(f"chitchat_to_jsonl: {error}") from None
    # Everything is read and checked before the output is written: a bad input leaves no partial file.
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"chitchat_to_jsonl: {len(rows)} examples written to {args.output}")


if __name__ == "__main__":
    main()
