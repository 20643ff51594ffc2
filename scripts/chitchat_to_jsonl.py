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


def conversation_turns(messages: list[list[dict]]) -> list[dict]:
    """The dataset's message groups as {role, content} turns: a group's texts joined by spaces, groups
    by the same sender merged, the opener as the user."""
    turns: list[dict] = []
    senders: list[str] = []
    for group in messages:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="JSONL file to write")
    parser.add_argument("--context-turns", type=int, default=3, help="turns before the answer kept as its context (default 3)")
    args = parser.parse_args()
    try:
        from chitchat_dataset import Dataset
    except ImportError:
        raise SystemExit("chitchat_to_jsonl: the dataset ships in the chitchat-dataset package: pip install chitchat-dataset==0.9.0")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    with open(args.output, "w") as stream:
        for conversation_id, conversation in sorted(Dataset().items()):
            for messages in examples(conversation_turns(conversation["messages"]), args.context_turns):
                stream.write(json.dumps({"conversation": conversation_id, "messages": messages}, ensure_ascii=False) + "\n")
                rows += 1
    print(f"chitchat_to_jsonl: {rows} examples written to {args.output}")


if __name__ == "__main__":
    main()
