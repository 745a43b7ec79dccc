"""The benchmarks' official files parsed once (vlm/data/official.py); here easy-VQA, read from the installed
`easy-vqa` package (the other benchmarks' files are pinned through their converters and eval readers)."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import easy_vqa
import pytest

from vlm.data import official


def test_easy_vqa_every_answer_has_one_type():
    answers = easy_vqa.get_answers()
    assert len(answers) == 13 and sorted(answers) == sorted(official.EASY_VQA_TYPE_OF)
    assert sum(len(a) for a in official.EASY_VQA_TYPES.values()) == len(official.EASY_VQA_TYPE_OF)
    assert {official.EASY_VQA_TYPE_OF[a] for a in ("circle", "rectangle", "triangle")} == {"shape"}
    assert {official.EASY_VQA_TYPE_OF[a] for a in ("yes", "no")} == {"yes/no"}


@pytest.mark.parametrize(("split", "n", "n_images", "yes_no"), [("test", 9673, 1000, 7136),
                                                                 ("train", 38575, 4000, 28407)])
def test_easy_vqa_splits_match_the_package(split, n, n_images, yes_no):
    """The package's own readers and its README's counts (data/README.md: questions, images, yes/no questions)."""
    off = official.easy_vqa(split=split)
    entries = off.entries()
    texts, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    assert len(entries) == n and len(paths) == n_images
    assert [e.question for e in entries] == texts and [e.answers for e in entries] == [[a] for a in answers]
    assert [e.target for e in entries] == answers and [e.fields["image_id"] for e in entries] == image_ids
    assert [e.question_id for e in entries[:2]] == [f"{split}-0", f"{split}-1"]
    assert len({e.question_id for e in entries}) == n
    image_dir = Path(off.info["image_dir"])
    assert all(image_dir / e.image == Path(paths[e.fields["image_id"]]) for e in entries)
    assert Counter(e.question_type for e in entries)["yes/no"] == yes_no
    assert {e.question_type for e in entries} == set(official.EASY_VQA_TYPES)
    assert off.files["questions"]["size"] > 0 and off.info["root"] == str(official.easy_vqa_root().resolve())


def test_easy_vqa_bad_entries_and_a_copy_of_the_data(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test/questions.json").write_text(json.dumps(
        [["what shape is it?", "circle", 3], ["what colour?", "purple", 3], ["is it?", "yes"], ["is it?", "no", "3"]]))
    off = official.easy_vqa(tmp_path, "test")
    e = off.parse(off.items[0], 0)
    assert (e.question_id, e.image, e.answers, e.question_type) == ("test-0", "3.png", ["circle"], "shape")
    assert off.info["image_dir"] == str((tmp_path / "test/images").resolve())
    reasons = []
    for i in (1, 2, 3):
        with pytest.raises(official.BadEntry) as err:
            off.parse(off.items[i], i)
        reasons.append(err.value.reason)
    assert reasons == ["unknown_answer", "malformed_item", "malformed_item"]
    with pytest.raises(ValueError, match="test-1: unknown_answer"):  # the evaluation readers stop at a bad entry
        off.entries()
    with pytest.raises(ValueError, match="split 'val'"):
        official.easy_vqa(tmp_path, "val")
    with pytest.raises(FileNotFoundError):
        official.easy_vqa(tmp_path, "train")


def test_easy_vqa_without_the_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # as if not installed: importlib finds no spec
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps easy-vqa==1.0")):
        official.easy_vqa()
