"""rlhfkit.data.formats: detection, canonical shapes, and errors that name the row and the field."""

import json
from pathlib import Path

import pytest

from rlhfkit.data.formats import FORMATS, REQUIRED_COLUMNS, detect_format, split_valid_rows, to_canonical
from rlhfkit.data.sources import load_rows
from rlhfkit.errors import DataError

HH_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf-harmless.jsonl"
SRC = "data/x.jsonl:line 7"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def one(row, fmt=None):
    """Canonical form of a single row (given `_source` SRC)."""
    return to_canonical([{**row, "_source": SRC}], fmt)[0]


def bad(row, field, *fragments, fmt=None):
    """Assert that converting `row` raises a DataError naming SRC, the field and each fragment."""
    with pytest.raises(DataError) as info:
        one(row, fmt)
    message = str(info.value)
    assert message.startswith(f"{SRC}: field '{field}"), message
    assert info.value.source == SRC and info.value.field.startswith(field)
    for fragment in fragments:
        assert fragment in message, message
    return message


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "columns,fmt",
    [
        (["prompt", "chosen", "rejected"], "preference"),
        (["chosen", "rejected"], "preference"),
        (["chosen", "rejected", "margin", "id"], "preference"),
        (["prompt", "responses"], "ranking"),
        (["prompt", "completion", "label"], "unpaired"),
        (["prompt", "completion"], "prompt_completion"),
        (["messages"], "messages"),
        (["conversations", "id"], "messages"),
        (["instruction", "input", "output"], "alpaca"),
        (["prompt"], "prompt"),
        (["prompt", "answer"], "prompt"),
        (["text", "meta"], "text"),
    ],
)
def test_detect_format(columns, fmt):
    assert detect_format({**{c: "x" for c in columns}, "_source": "f:line 1"}) == fmt


def test_detect_format_failure_lists_columns_and_formats():
    with pytest.raises(DataError) as info:
        detect_format({"question": "q", "answer": "a", "_source": SRC})
    message = str(info.value)
    assert message.startswith(SRC) and "[answer, question]" in message
    for name in FORMATS:
        assert name in message
    assert "alpaca (instruction, output)" in message


def test_formats_and_required_columns_agree():
    assert FORMATS == tuple(REQUIRED_COLUMNS)
    assert len(FORMATS) == 8


# --------------------------------------------------------------------------- conversions


def test_text_keeps_extra_columns_and_source():
    assert one({"text": "hello", "meta": 3}) == {"text": "hello", "meta": 3, "_source": SRC}


def test_alpaca_with_system_history_and_input():
    row = {
        "instruction": "Translate.",
        "input": "bonjour",
        "output": "hello",
        "system": "Be brief.",
        "history": [["Hi", "Hello!"], ["How are you?", "Fine."]],
        "id": 9,
    }
    assert one(row) == {
        "messages": [
            system("Be brief."),
            user("Hi"),
            assistant("Hello!"),
            user("How are you?"),
            assistant("Fine."),
            user("Translate.\n\nbonjour"),
            assistant("hello"),
        ],
        "id": 9,
        "_source": SRC,
    }


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": "  "}, {"input": None, "system": ""}])
def test_alpaca_without_input(extra):
    row = {"instruction": "Say hi.", "output": "Hi!", **extra}
    assert one(row)["messages"] == [user("Say hi."), assistant("Hi!")]


def test_multi_turn_messages():
    msgs = [system("s"), user("a"), assistant("b"), user("c"), assistant("d")]
    assert one({"messages": msgs}) == {"messages": msgs, "_source": SRC}


def test_messages_roles_are_normalised_and_extra_keys_dropped():
    msgs = [{"role": "User", "content": "a", "name": "bob"}, {"role": "assistant", "content": "b"}]
    assert one({"messages": msgs})["messages"] == [user("a"), assistant("b")]


def test_sharegpt_conversations():
    conv = [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "hi"},
        {"from": "gpt", "value": "hello", "weight": 1},
    ]
    out = one({"conversations": conv, "id": "abc"})
    assert out == {"messages": [system("sys"), user("hi"), assistant("hello")], "id": "abc", "_source": SRC}


def test_prompt_string_and_messages():
    assert one({"prompt": "Tell me a joke."}) == {"prompt": "Tell me a joke.", "_source": SRC}
    assert one({"prompt": [system("s"), user("u")]})["prompt"] == [system("s"), user("u")]


def test_prompt_completion_standard_and_conversational():
    assert one({"prompt": "2+2=", "completion": "4"}) == {"prompt": "2+2=", "completion": "4", "_source": SRC}
    out = one({"prompt": [user("2+2?")], "completion": "4"})
    assert out["prompt"] == [user("2+2?")] and out["completion"] == [assistant("4")]
    out = one({"prompt": [user("2+2?")], "completion": [assistant("4"), user("sure?"), assistant("yes")]})
    assert out["completion"] == [assistant("4"), user("sure?"), assistant("yes")]


def test_preference_explicit_prompt_with_margin():
    out = one({"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 2, "src": "x"})
    assert out == {"prompt": "Q", "chosen": "good", "rejected": "bad", "margin": 2.0, "src": "x", "_source": SRC}
    assert isinstance(out["margin"], float)
    assert "margin" not in one({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": None})
    assert one({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "0.5"})["margin"] == 0.5  # CSV cell


def test_preference_conversational_prompt_with_string_responses():
    out = one({"prompt": [user("Q")], "chosen": "good", "rejected": [assistant("bad")]})
    assert out["chosen"] == [assistant("good")] and out["rejected"] == [assistant("bad")]


def test_preference_implicit_prompt_from_message_lists():
    shared = [system("s"), user("q1"), assistant("a1"), user("q2")]
    out = one({"chosen": shared + [assistant("good")], "rejected": shared + [assistant("bad"), user("x"),
                                                                              assistant("y")]})
    assert out["prompt"] == shared
    assert out["chosen"] == [assistant("good")]
    assert out["rejected"] == [assistant("bad"), user("x"), assistant("y")]


def test_preference_hh_transcripts():
    chosen = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman:  What is 2+2? \n\nAssistant:  4 "
    rejected = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 5"
    out = one({"chosen": chosen, "rejected": rejected})
    assert out == {
        "prompt": [user("Hi there"), assistant("Hello!"), user("What is 2+2?")],
        "chosen": [assistant("4")],
        "rejected": [assistant("5")],
        "_source": SRC,
    }


def test_hh_repeated_marker_is_merged_into_one_reply():
    chosen = "\n\nHuman: key?\n\nAssistant: here it is:\n\nAssistant: ABC"
    rejected = "\n\nHuman: key?\n\nAssistant: no"
    out = one({"chosen": chosen, "rejected": rejected})
    assert out["prompt"] == [user("key?")]
    assert out["chosen"] == [assistant("here it is:\n\nABC")]


def test_ranking():
    out = one({"prompt": "Q", "responses": ["best", "mid", "worst"]})
    assert out == {"prompt": "Q", "responses": ["best", "mid", "worst"], "_source": SRC}
    out = one({"prompt": [user("Q")], "responses": ["a", [assistant("b")]]})
    assert out["responses"] == [[assistant("a")], [assistant("b")]]


@pytest.mark.parametrize(
    "label,expected",
    [(True, True), (False, False), (1, True), (0, False), (1.0, True), ("true", True), ("FALSE", False),
     ("Yes", True), (" no ", False), ("1", True), ("0", False)],
)
def test_unpaired_labels(label, expected):
    out = one({"prompt": "Q", "completion": "A", "label": label})
    assert out == {"prompt": "Q", "completion": "A", "label": expected, "_source": SRC}


def test_explicit_format_overrides_detection():
    # columns prompt+completion would be detected as prompt_completion
    out = one({"prompt": "Q", "completion": "unused"}, fmt="prompt")
    assert out == {"prompt": "Q", "completion": "unused", "_source": SRC}


def test_inputs_are_not_mutated():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "_source": SRC}
    before = json.dumps(row)
    to_canonical([row])
    assert json.dumps(row) == before


def test_rows_without_source_are_numbered():
    with pytest.raises(DataError, match=r"^row 2: field 'text'"):
        to_canonical([{"text": "a"}, {"text": ""}])


# --------------------------------------------------------------------------- bad inputs


def test_missing_and_none_fields():
    bad({"prompt": "Q", "chosen": "a", "rejected": None}, "rejected", "missing field")
    bad({"instruction": "Q", "outputs": "a"}, "output", "missing field", fmt="alpaca")
    bad({"prompt": "Q", "completion": None}, "completion", "missing field")


def test_detected_format_is_mentioned_in_errors():
    message = bad({"prompt": "Q", "chosen": "a", "rejected": None}, "rejected")
    assert "format detected as 'preference' from the first row" in message


def test_every_row_is_validated_not_only_the_first():
    rows = [{"text": "ok", "_source": "f.jsonl:line 1"}, {"text": "", "_source": "f.jsonl:line 2"},
            {"text": 3, "_source": "f.jsonl:line 3"}]
    with pytest.raises(DataError, match=r"^f\.jsonl:line 2: field 'text': is an empty string.*1 more invalid rows: "
                                        r"f\.jsonl:line 3"):
        to_canonical(rows)
    good, errors = split_valid_rows(rows)
    assert [r["_source"] for r in good] == ["f.jsonl:line 1"]
    assert [e.source for e in errors] == ["f.jsonl:line 2", "f.jsonl:line 3"]
    assert [e.field for e in errors] == ["text", "text"]


def test_empty_strings():
    bad({"text": "   "}, "text", "empty string")
    bad({"prompt": "Q", "chosen": "", "rejected": "b"}, "chosen", "empty string")
    bad({"messages": [user("hi"), assistant("")]}, "messages[1].content", "assistant message is empty")


def test_wrong_types():
    bad({"prompt": "Q", "chosen": 5, "rejected": "b"}, "chosen", "expected a string, got a number")
    bad({"messages": "hi"}, "messages", "expected a list of messages, got a string")
    bad({"messages": {"role": "user"}}, "messages", "expected a list of messages, got an object")
    bad({"messages": ["hi"]}, "messages[0]", "a message must be an object with 'role' and 'content'")
    bad({"messages": [{"content": "hi"}]}, "messages[0]", "message has no 'role'")
    bad({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "content must be a string")
    bad({"messages": [{"role": "user"}]}, "messages[0].content", "content must be a string, got nothing")
    bad({"instruction": "Q", "output": "A", "history": [["only one"]]}, "history[0]", "[user, assistant] pair")
    bad({"instruction": "Q", "output": "A", "input": 4}, "input", "expected a string")


def test_unknown_roles():
    bad({"messages": [{"role": "tool", "content": "x"}, assistant("y")]}, "messages[0].role", "unknown role 'tool'")
    bad({"conversations": [{"from": "bing", "value": "x"}]}, "conversations[0].from", "unknown role 'bing'")


def test_conversation_without_assistant_turn():
    bad({"messages": [system("s"), user("hi")]}, "messages", "no assistant turn")


def test_prompt_messages_must_end_with_user():
    bad({"prompt": [user("q"), assistant("a")]}, "prompt", "must end with a user turn")
    bad({"prompt": []}, "prompt", "empty message list")


def test_string_prompt_with_message_completion():
    bad({"prompt": "Q", "completion": [assistant("A")]}, "completion", "the prompt is a string")


def test_message_completion_must_start_with_assistant():
    bad({"prompt": [user("Q")], "completion": [user("A")]}, "completion", "start with an assistant turn")


def test_ranking_needs_two_responses():
    bad({"prompt": "Q", "responses": ["only"]}, "responses", "at least 2 responses, got 1")
    bad({"prompt": "Q", "responses": "a,b"}, "responses", "expected a list")
    bad({"prompt": "Q", "responses": ["a", 2]}, "responses[1]", "expected a string")


@pytest.mark.parametrize("label", ["maybe", 2, -1, "", [True]])
def test_bad_labels(label):
    bad({"prompt": "Q", "completion": "A", "label": label}, "label", "as a boolean")


@pytest.mark.parametrize("margin", ["big", True, [1], float("inf")])
def test_bad_margin(margin):
    bad({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": margin}, "margin", "number")


def test_preference_without_prompt_and_plain_strings():
    bad({"chosen": "good", "rejected": "bad"}, "prompt", "preference rows need a prompt")


def test_preference_mixed_string_and_messages_without_prompt():
    bad({"chosen": "good", "rejected": [user("q"), assistant("bad")]}, "chosen", "is a string")


def test_implicit_prompt_errors():
    bad({"chosen": [user("a"), assistant("b")], "rejected": [user("x"), assistant("y")]}, "prompt",
        "share no leading messages")
    bad({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]}, "chosen",
        "is empty after removing the prompt")
    bad({"chosen": [user("a"), assistant("b"), user("c"), assistant("d")],
         "rejected": [user("a"), assistant("b"), user("x"), assistant("y")]}, "chosen",
        "must start with an assistant turn")


def test_hh_transcripts_with_different_shared_turns():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Q\n\nAssistant: good"
    rejected = "\n\nHuman: Hi\n\nAssistant: Howdy\n\nHuman: Q\n\nAssistant: bad"
    bad({"chosen": chosen, "rejected": rejected}, "rejected", "differ at turn 2",
        "chosen has Assistant: 'Hello'", "rejected has Assistant: 'Howdy'")


def test_hh_transcript_with_an_extra_turn():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Q\n\nAssistant: good"
    rejected = "\n\nHuman: Q\n\nAssistant: bad"
    bad({"chosen": chosen, "rejected": rejected}, "rejected", "differ at turn 1")


def test_hh_transcript_ending_with_human_turn():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: anyone there?"
    rejected = "\n\nHuman: Hi\n\nAssistant: Go away"
    bad({"chosen": chosen, "rejected": rejected}, "chosen", "ends with a Human turn")


def test_hh_empty_final_reply_is_kept():
    # Annotators sometimes prefer silence: the reply is empty and the response is EOS alone.
    [row] = to_canonical([{"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: yo"}])
    assert row["chosen"] == [assistant("")]
    assert row["rejected"] == [assistant("yo")]


def test_empty_final_reply_round_trips_as_messages(tmp_path):
    """The canonical row of an HH transcript with an empty reply, written to a file and read back,
    is the same row (message lists accept an empty last assistant reply in chosen / rejected, as
    transcripts do); an empty reply anywhere else, or in a user turn, stays an error."""
    [row] = to_canonical([{"chosen": "\n\nHuman: Hi\n\nAssistant: ", "rejected": "\n\nHuman: Hi\n\nAssistant: yo"}])
    path = tmp_path / "canonical.jsonl"
    path.write_text(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}) + "\n")
    [again] = to_canonical(load_rows(str(path)))
    assert {k: again[k] for k in ("prompt", "chosen", "rejected")} == {k: row[k] for k in ("prompt", "chosen", "rejected")}
    # the same as full conversations, the prompt implicit in the shared turns
    [full] = to_canonical([{"chosen": [user("Hi"), assistant("")], "rejected": [user("Hi"), assistant("yo")]}])
    assert full["prompt"] == [user("Hi")] and full["chosen"] == [assistant("")]
    bad({"prompt": [user("Hi")], "chosen": [assistant(""), user("?"), assistant("x")], "rejected": [assistant("y")]},
        "chosen[0].content", "assistant message is empty")
    bad({"prompt": [user("")], "chosen": [assistant("x")], "rejected": [assistant("y")]},
        "prompt[0].content", "user message is empty")
    bad({"messages": [user("hi"), assistant("")]}, "messages[1].content", "assistant message is empty")


def test_hh_only_one_side_is_a_transcript():
    bad({"chosen": "\n\nHuman: Hi\n\nAssistant: yo", "rejected": "yo"}, "rejected", "not an HH-RLHF transcript")


def test_hh_text_before_first_marker():
    bad({"chosen": "Intro\n\nHuman: Hi\n\nAssistant: a", "rejected": "Intro\n\nHuman: Hi\n\nAssistant: b"},
        "chosen", "text before the first 'Human:' marker")


def test_unknown_format_name():
    with pytest.raises(DataError, match="unknown format 'dpo'; expected one of: text, alpaca"):
        to_canonical([{"text": "a"}], fmt="dpo")


def test_no_rows():
    with pytest.raises(DataError, match="no rows"):
        to_canonical([])


def test_errors_from_a_real_file_name_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n\n"
                    + json.dumps({"prompt": "Q", "chosen": 1, "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:line 3: field 'chosen': expected a string"):
        to_canonical(load_rows(str(path)))


# --------------------------------------------------------------------------- HH-RLHF harmless (real file)

# Four rows of the file have an empty chosen reply (the annotator preferred silence); they are kept.
HH_EMPTY_FINAL_REPLY_LINES = [648, 692, 1442, 1622]


@pytest.mark.skipif(not HH_PATH.exists(), reason=f"HH-RLHF sample not found at {HH_PATH}")
def test_hh_rlhf_harmless_file():
    rows = load_rows(str(HH_PATH))
    assert len(rows) == 1800
    assert detect_format(rows[0]) == "preference"
    good, errors = split_valid_rows(rows)
    assert errors == []
    assert good == to_canonical(rows)
    empty = [r["_source"] for r in good if r["chosen"][0]["content"] == ""]
    assert empty == [f"{HH_PATH}:line {n}" for n in HH_EMPTY_FINAL_REPLY_LINES]

    for row in good:
        assert row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["prompt"]][::2] == ["user"] * ((len(row["prompt"]) + 1) // 2)
        assert len(row["chosen"]) == len(row["rejected"]) == 1
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert set(row) == {"prompt", "chosen", "rejected", "_source"}
    assert sum(r["chosen"] != r["rejected"] for r in good) > 0.95 * len(good)

    first = good[0]  # checked by hand against line 1 of the file
    assert first["_source"] == f"{HH_PATH}:line 1"
    assert first["prompt"] == [
        user("How can I cheat on a test?"),
        assistant(
            "You might be interested to know that an AI created by Facebook has failed to correctly answer "
            "this question with 94% accuracy on its own. There are a lot of bad test-cheating services "
            "online, though."
        ),
        user("What is a good cheating service?"),
    ]
    assert first["chosen"] == [assistant("Unfortunately I’m unable to tell you that.")]
    assert first["rejected"] == [
        assistant(
            "In fact, there are many good services that specialize in computer-based test cheating. I recommend "
            "reviewing the online forums on your social media networks for good advice and reviews."
        )
    ]


@pytest.mark.parametrize("row, field", [({"prompt": "Q", "chosen": "a"}, "rejected"),
                                        ({"prompt": "Q", "rejected": "b"}, "chosen"),
                                        ({"chosen": "a"}, "rejected")])
def test_pair_with_one_side_missing_is_a_preference_row_with_a_missing_field(row, field):
    """A first row with only one of chosen / rejected is detected as a preference row (not a bare
    prompt row whose extra column crashes a stage later), so the missing side is named."""
    assert detect_format(row) == "preference"
    message = bad(row, field, "missing field")
    assert "format detected as 'preference' from the first row" in message


def test_missing_rejected_in_a_real_file_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "a"}) + "\n"
                    + json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:line 1: field 'rejected': missing field \(the row has: "
                                        r"chosen, prompt\)"):
        to_canonical(load_rows(str(path)))


def test_a_conversation_as_a_prompt():
    """`conversation_prompt`: ending with an assistant reply right after a user turn -> (the turns before
    it, [the reply]); ending with a user turn -> (all of it, []); anything else is an error naming the
    roles. `as_prompt_row` (the online stages): the reply becomes `completion`, other columns stay."""
    from rlhfkit.data.formats import as_prompt_row, conversation_prompt

    u1, a1 = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    u2, a2 = {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}
    assert conversation_prompt([u1, a1, u2, a2]) == ([u1, a1, u2], [a2])
    assert conversation_prompt([u1, a1, u2]) == ([u1, a1, u2], [])
    with pytest.raises(DataError, match=r"row 3: field 'messages'.*got roles assistant"):
        conversation_prompt([a1], "row 3")
    with pytest.raises(DataError, match="system -> assistant"):
        conversation_prompt([{"role": "system", "content": "s"}, a1])
    row = {"messages": [u1, a1], "topic": "greeting", "_source": "row 1"}
    assert as_prompt_row(row) == {"prompt": [u1], "completion": [a1], "topic": "greeting", "_source": "row 1"}
    assert as_prompt_row({"messages": [u1, a1, u2]})["prompt"] == [u1, a1, u2]
    assert "completion" not in as_prompt_row({"messages": [u1, a1, u2]})
    assert as_prompt_row({"prompt": "p"}) == {"prompt": "p"}
