"""rlhfkit.data.sources: every file type round-trips, `_source` points at the row, errors name file and line."""

import json

import pytest

from rlhfkit.data.sources import load_rows
from rlhfkit.errors import DataError

ROWS = [
    {"prompt": "What is 2+2?", "completion": "4"},
    {"prompt": "Name a colour.", "completion": "Blue"},
    {"prompt": "Say hi.", "completion": "Hi!"},
]


def _strip_source(rows):
    return [{k: v for k, v in r.items() if k != "_source"} for r in rows]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- round trips


def test_json_list_round_trips_with_item_sources(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ROWS, indent=2))
    rows = load_rows(str(path))
    assert _strip_source(rows) == ROWS
    assert [r["_source"] for r in rows] == [f"{path}:item {i}" for i in (1, 2, 3)]


def test_json_file_that_is_really_json_lines(tmp_path):
    path = _write_jsonl(tmp_path / "train.json", ROWS)
    rows = load_rows(path)
    assert _strip_source(rows) == ROWS
    assert rows[2]["_source"] == f"{path}:line 3"


def test_jsonl_keeps_line_separator_characters_inside_strings(tmp_path):
    # valid JSON Lines (json.dumps(..., ensure_ascii=False) writes U+2028 / U+0085 as they are):
    # only \n, \r\n and \r end a line, so the rows and their line numbers stay right
    path = tmp_path / "train.jsonl"
    rows = [{"text": "a\u2028b"}, {"text": "c\x85d\u2029e"}, {"text": "f"}]
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    got = load_rows(str(path))
    assert _strip_source(got) == rows
    assert [r["_source"] for r in got] == [f"{path}:line {i}" for i in (1, 2, 3)]


def test_jsonl_round_trips_and_skips_blank_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1]), json.dumps(ROWS[2]), ""]
    path.write_text("\n".join(lines))
    rows = load_rows(str(path))
    assert _strip_source(rows) == ROWS
    assert [r["_source"] for r in rows] == [f"{path}:line 1", f"{path}:line 4", f"{path}:line 5"]


def test_csv_round_trips_rows_counted_without_header_and_empty_cells_are_none(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('prompt,completion\n"What is 2+2?",4\n"A quoted\nmulti-line prompt",yes\nSay hi.,\n')
    rows = load_rows(str(path))
    assert _strip_source(rows) == [
        {"prompt": "What is 2+2?", "completion": "4"},
        {"prompt": "A quoted\nmulti-line prompt", "completion": "yes"},
        {"prompt": "Say hi.", "completion": None},
    ]
    # row N is the Nth data row (header excluded), even when a cell spans lines
    assert [r["_source"] for r in rows] == [f"{path}:row {i}" for i in (1, 2, 3)]


def test_csv_keeps_line_separator_characters_inside_cells(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("prompt,completion\r\nsay a\u2028b,c\x85d\r\nnext,row\n", encoding="utf-8")
    assert _strip_source(load_rows(str(path))) == [{"prompt": "say a\u2028b", "completion": "c\x85d"},
                                                    {"prompt": "next", "completion": "row"}]


def test_csv_with_too_many_cells_names_the_row(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"bad\.csv:row 2: row has 3 cells but the header has 2"):
        load_rows(str(path))


def test_parquet_round_trips_nested_values_and_nulls(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "train.parquet"
    frame = pd.DataFrame(
        {
            "messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]] * 2,
            "score": [1.5, float("nan")],
            "note": ["a", None],
        }
    )
    frame.to_parquet(path)
    rows = load_rows(str(path))
    assert rows[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert rows[0]["score"] == 1.5 and rows[1]["score"] is None and rows[1]["note"] is None
    assert [r["_source"] for r in rows] == [f"{path}:row 1", f"{path}:row 2"]


def test_save_to_disk_dataset_and_dataset_dict_with_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "plain"))
    rows = load_rows(str(tmp_path / "plain"))
    assert _strip_source(rows) == ROWS
    assert rows[1]["_source"] == f"{tmp_path / 'plain'}:row 2"

    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    train = load_rows(str(tmp_path / "dict"))
    assert _strip_source(train) == ROWS
    assert train[0]["_source"] == f"{tmp_path / 'dict'}[train]:row 1"
    test = load_rows(f"{tmp_path / 'dict'}:test")
    assert _strip_source(test) == ROWS[:1]
    assert test[0]["_source"] == f"{tmp_path / 'dict'}[test]:row 1"
    with pytest.raises(DataError, match="has no split 'validation'; the splits are: train, test"):
        load_rows(f"{tmp_path / 'dict'}:validation")


def test_a_list_of_specs_is_concatenated_in_order(tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    b = tmp_path / "b.csv"
    b.write_text("prompt,completion\nSay hi.,Hi!\n")
    rows = load_rows([a, str(b)])
    assert _strip_source(rows) == ROWS
    assert [r["_source"] for r in rows] == [f"{a}:line 1", f"{a}:line 2", f"{b}:row 1"]


def test_data_source_column_is_overwritten_with_the_location(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "_source": "elsewhere"}])
    assert load_rows(path)[0]["_source"] == f"{path}:line 1"


# --------------------------------------------------------------------------- errors


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:line 3: invalid JSON: Unterminated string"):
        load_rows(str(path))


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:line 2: expected a JSON object, got a list"):
        load_rows(str(path))


def test_malformed_json_list_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:line 3: invalid JSON"):
        load_rows(str(path))


def test_json_list_item_that_is_not_an_object(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"text": "a"}, "b"]')
    with pytest.raises(DataError, match=r"bad\.json:item 2: expected a JSON object, got a string"):
        load_rows(str(path))


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.csv", "missing.parquet", "missing.json"])
def test_nonexistent_file(tmp_path, name):
    with pytest.raises(DataError, match=rf"{name}: file does not exist"):
        load_rows(str(tmp_path / name))


def test_nonexistent_relative_path_is_not_sent_to_the_hub():
    with pytest.raises(DataError, match="file does not exist"):
        load_rows("./no/such/dir")


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", ""),
                                          ("e.json", "[]"), ("e.csv", ""), ("e.csv", "text\n")])
def test_empty_file_has_no_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{name}: no rows"):
        load_rows(str(path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported file type '\.txt'"):
        load_rows(str(path))


def test_split_on_a_plain_file_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(DataError, match="selects a split"):
        load_rows(f"{path}:test")


def test_hub_failure_is_explained(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_rows("someone/some-data:test")
    message = str(info.value)
    assert "could not load someone/some-data (split 'test') from the Hugging Face hub" in message
    assert "no internet" in message and "is it a local path that does not exist?" in message


def test_hub_rows_get_split_and_row_sources(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    rows = load_rows("owner/name")
    assert calls == [("owner/name", "train")]
    assert rows[2]["_source"] == "owner/name[train]:row 3"


# --------------------------------------------------------------------------- column_map


def test_column_map_renames_every_row(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q1", "answer": "a1", "id": 1}, {"question": "q2"}])
    rows = load_rows(path, column_map={"question": "prompt", "answer": "completion"})
    assert _strip_source(rows) == [{"prompt": "q1", "completion": "a1", "id": 1}, {"prompt": "q2"}]
    assert rows[0]["_source"] == f"{path}:line 1"


def test_column_map_swap_is_allowed(tmp_path):
    path = _write_jsonl(tmp_path / "swap.jsonl", [{"chosen": "b", "rejected": "a"}])
    rows = load_rows(path, column_map={"chosen": "rejected", "rejected": "chosen"})
    assert _strip_source(rows) == [{"rejected": "b", "chosen": "a"}]


def test_column_map_missing_column_names_it_and_lists_the_columns(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        load_rows(path, column_map={"query": "prompt"})
    message = str(info.value)
    assert "'query'" in message and "qa.jsonl" in message and "the columns are: answer, question" in message


def test_column_map_onto_an_existing_column(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "prompt": "p"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:line 1: field 'prompt': column_map renames a column onto"):
        load_rows(path, column_map={"question": "prompt"})
