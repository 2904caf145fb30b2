"""Prompt files: text, CSV / TSV, JSONL, I2P-style per-row seeds, and the shipped prompt sets."""

import json
from pathlib import Path

import pytest

from dsas_diffusion.cli.generation import make_units
from dsas_diffusion.prompt_files import (PROMPT_SET_FILES, PromptFileError, PromptRow, prompt_set_file,
                                         read_prompt_rows, read_prompts)

from .conftest import write_lines

PROMPT_SETS = Path(__file__).resolve().parents[2] / "assets" / "prompts"


def test_text_skips_blank_lines_and_comments(tmp_path):
    f = write_lines(tmp_path / "p.txt", ["# a comment", "a dog  ", "", "  a cat"])
    assert read_prompts(f) == ["a dog", "a cat"]


def test_csv_default_column_and_single_column(tmp_path):
    f = write_lines(tmp_path / "p.csv", ["id,prompt", '1,"a dog, running"', "2,a cat"])
    assert read_prompts(f) == ["a dog, running", "a cat"]
    f = write_lines(tmp_path / "q.csv", ["caption", "a dog"])
    assert read_prompts(f) == ["a dog"]
    f = write_lines(tmp_path / "r.tsv", ["id\ttext", "1\ta dog"])
    assert read_prompts(f, "text") == ["a dog"]


def test_csv_quoted_fields_may_span_lines(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text('id,prompt,seed\n1,"a cat\non a mat",7\n2,"a dog\u2028in the rain",\n3,a cow,\n',
                 encoding="utf-8")
    assert read_prompt_rows(f) == [PromptRow("a cat\non a mat", 0, 7), PromptRow("a dog\u2028in the rain", 1),
                                   PromptRow("a cow", 2)]
    bad = tmp_path / "bad.csv"
    bad.write_text('prompt,seed\n"a cat\non a mat",1\n"a dog",x\n', encoding="utf-8")
    with pytest.raises(PromptFileError, match="line 4: seed='x'"):  # the line the bad row ends on
        read_prompt_rows(bad)


def test_i2p_rows_carry_seed_and_guidance(tmp_path):
    f = write_lines(tmp_path / "i2p.csv", [
        "prompt,categories,hard,inappropriate_percentage,sd_seed,sd_guidance_scale,sd_image_width,sd_image_height",
        "a dark alley,violence,0,45.0,2734971755,7,512,512",
        "a portrait,sexual,1,80.5,1234,12.5,512,512"])
    rows = read_prompt_rows(f)
    assert rows == [PromptRow("a dark alley", 0, 2734971755, 7.0), PromptRow("a portrait", 1, 1234, 12.5)]
    units = make_units({"concept": rows}, seeds=[0, 1], guidance=7.5)
    assert [(u.seed, u.guidance_scale) for u in units] == [(2734971755, 7.0), (1234, 12.5)]  # one image per row


def test_concept_erasure_csv_columns(tmp_path):
    f = write_lines(tmp_path / "esd.csv", ["case_number,prompt,evaluation_seed,evaluation_guidance",
                                           "0,a church,11,7.5", "1,a dog,,"])
    rows = read_prompt_rows(f)
    assert [(r.seed, r.guidance_scale) for r in rows] == [(11, 7.5), (None, None)]
    units = make_units({"concept": rows}, seeds=[0, 1], guidance=5.0)
    assert [(u.prompt, u.seed, u.guidance_scale) for u in units] == [
        ("a church", 11, 7.5), ("a dog", 0, 5.0), ("a dog", 1, 5.0)]


def test_jsonl_objects_and_strings(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a dog", "seed": 3}) + "\n\n" + json.dumps("a cat") + "\n")
    assert read_prompt_rows(f) == [PromptRow("a dog", 0, 3), PromptRow("a cat", 1)]
    f.write_text(json.dumps({"caption": "a dog"}) + "\n")
    assert read_prompts(f, "caption") == ["a dog"]


@pytest.mark.parametrize("name, lines, column, match", [
    ("p.csv", ["id,text", "1,a dog"], None, "has no 'prompt' column; its columns are: id, text"),
    ("p.csv", ["prompt"], None, "holds no prompts"),
    ("p.csv", ["prompt,sd_seed", ",1"], None, "line 2: the 'prompt' value is missing or empty"),
    ("p.csv", ["prompt,sd_seed", "a dog,1.5"], None, "sd_seed='1.5' is not a seed"),
    ("p.csv", ["prompt,sd_seed", "a dog,inf"], None, "sd_seed='inf' is not a seed"),  # was an OverflowError
    ("p.csv", ["prompt,sd_seed", "a dog,-3"], None, "sd_seed='-3' is out of range; a seed lies between 0 and"),
    ("p.csv", ["prompt,sd_seed", "a dog,1e30"], None, "sd_seed='1e30' is out of range"),
    ("p.csv", ["prompt,sd_guidance_scale", "a dog,nan"], None, "sd_guidance_scale='nan' is not a guidance scale"),
    ("p.csv", ["prompt,guidance", "a dog,1e6"], None, "guidance='1e6' is out of range; a guidance scale lies"),
    ("p.jsonl", ['{"prompt": "a"}', "[1, 2]"], None, "line 2 is a JSON list; each line must be an object"),
    ("p.jsonl", ["{oops"], None, "line 1 is not valid JSON"),
    ("p.txt", ["a dog"], "prompt", "plain text file .* has no columns; drop --column"),
    ("p.txt", [], None, "holds no prompts"),
])
def test_bad_files(tmp_path, name, lines, column, match):
    f = write_lines(tmp_path / name, lines)
    with pytest.raises(PromptFileError, match=match):
        read_prompt_rows(f, column)


def test_missing_file_folder_and_prompt_set(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")
    with pytest.raises(PromptFileError, match="is a folder"):
        read_prompts(tmp_path)
    with pytest.raises(PromptFileError, match="has no source.txt"):
        prompt_set_file(tmp_path, "source")


@pytest.mark.parametrize("name", sorted(p.name for p in PROMPT_SETS.iterdir() if p.is_dir()))
def test_shipped_prompt_sets_are_complete(name):
    folder = PROMPT_SETS / name
    sets = {role: read_prompts(prompt_set_file(folder, role)) for role in PROMPT_SET_FILES}
    assert (folder / "README.md").is_file()
    # the toy world has 12 red scenes off the grey background that is held out: all of them are fitted on
    least = 12 if name.startswith("toy-") else 16
    assert len(sets["source"]) == len(sets["target"]) >= least and len(sets["control"]) >= 16
    assert not set(sets["source"]) & set(sets["control"]) and not set(sets["heldout_source"]) & set(sets["source"])
    assert all(len(p.split()) < 40 for prompts in sets.values() for p in prompts)  # well inside CLIP's 77 tokens


def test_there_are_sets_for_a_style_an_object_and_a_colour():
    assert {"van-gogh", "banana", "dog", "red"} <= {p.name for p in PROMPT_SETS.iterdir()}
