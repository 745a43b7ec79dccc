"""Dataset converters (vlm/data/convert.py, data/convert.py): each dataset's official schema in, shards out."""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import easy_vqa
import pytest
import torch
import webdataset as wds
from PIL import Image

from vlm.compose import model_config
from vlm.data import convert as C
from vlm.data import official
from vlm.data.format import image_refs
from vlm.data.pipeline import ShardStream, collate_stream
from vlm.processor import Processor
from vlm.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
OPTS = dict(progress=False)


# ------------------------------------------------------------------------------------------------- helpers


def img_bytes(fmt: str = "JPEG", color=(200, 30, 30), size=(8, 6), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def write_img(path: Path, fmt: str = "JPEG", color=(200, 30, 30)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = img_bytes(fmt, color)
    path.write_bytes(data)
    return data


def write_corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(img_bytes("JPEG")[:40])  # a truncated JPEG: right header, no pixel data


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def read_shards(out: Path) -> list[dict]:
    shards = sorted(str(p) for p in out.glob("*.tar"))
    if not shards:
        return []
    samples = []
    for s in wds.WebDataset(shards, shardshuffle=False):
        record = json.loads(s["json"])
        images = {k: v for k, v in s.items() if not k.startswith("__") and k != "json"}
        assert sorted(images) == sorted(ref for ref, _ in image_refs(record))
        assert "." not in s["__key__"]
        samples.append({"key": s["__key__"], "record": record, "images": images})
    return samples


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def user_parts(record: dict) -> list:
    return record["messages"][0]["content"]


# --------------------------------------------------------------------------------------------------- VQAv2


def vqa_files(tmp_path: Path, subtype="val2014", with_subtype=True, n_answers=10):
    images = tmp_path / "images"
    kept = {}
    for image_id, color in ((42, (255, 0, 0)), (7, (0, 255, 0))):
        kept[image_id] = write_img(images / f"COCO_{subtype}_{image_id:012d}.jpg", color=color)
    write_corrupt(images / f"COCO_{subtype}_{13:012d}.jpg")  # 99: no file at all
    questions = [
        {"image_id": 42, "question": "What color is it?", "question_id": 420},
        {"image_id": 42, "question": "Is it red?", "question_id": 421},
        {"image_id": 7, "question": "What is it?", "question_id": 70},
        {"image_id": 99, "question": "Where is it?", "question_id": 990},  # missing image
        {"image_id": 13, "question": "How many?", "question_id": 130},  # corrupt image
        {"image_id": 7, "question": "   ", "question_id": 71},  # empty question
        {"image_id": 7, "question_id": 72},  # no question field
    ]
    qfile = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "questions": questions}
    if with_subtype:
        qfile["data_subtype"] = subtype
    answers = {420: ["red"] * 7 + ["pink"] * 3, 421: ["yes"] * n_answers, 70: ["apple"] * 9 + ["ball"],
               990: ["here"] * 10, 130: ["2"] * 10, 71: ["x"] * 10, 72: ["x"] * 10}
    types = {420: ("what color is the", "other"), 421: ("is it", "yes/no"), 70: ("what is", "other")}
    anns = [{"question_id": qid, "image_id": next(q["image_id"] for q in questions if q["question_id"] == qid),
             "question_type": types.get(qid, ("what", "other"))[0], "answer_type": types.get(qid, ("", "other"))[1],
             "multiple_choice_answer": a[0],
             "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1} for i, x in enumerate(a)]}
            for qid, a in answers.items()]
    q = write_json(tmp_path / "questions.json", qfile)
    a = write_json(tmp_path / "annotations.json", {"info": {}, "license": {}, "data_subtype": subtype,
                                                    "annotations": anns})
    return q, a, images, kept


def test_vqav2(tmp_path):
    q, a, images, kept = vqa_files(tmp_path)
    out = tmp_path / "out"
    result = C.convert_vqa(q, images, out, annotations=a, **OPTS)
    samples = read_shards(out)
    assert [s["key"] for s in samples] == ["vqav2_420", "vqav2_421", "vqav2_70"]
    rec = samples[0]["record"]
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
    assert user_parts(rec) == [{"type": "image_url", "image_url": {"url": "0.jpg", "detail": "auto"}},
                               {"type": "text", "text": "What color is it?"}]
    assert rec["messages"][1]["content"] == "red"
    assert rec["meta"] == {"dataset": "vqav2", "question_id": 420, "image_id": 42, "split": "val2014",
                           "answers": ["red"] * 7 + ["pink"] * 3, "question_type": "what color is the",
                           "answer_type": "other"}
    assert samples[0]["images"] == {"0.jpg": kept[42]}  # the file's own bytes
    assert samples[1]["images"] == {"0.jpg": kept[42]} and samples[2]["images"] == {"0.jpg": kept[7]}
    assert samples[2]["record"]["messages"][1]["content"] == "apple"
    s = summary(out)
    assert s == result
    assert s["written"] == 3 and s["items"] == 7 and s["skipped_total"] == 4
    assert s["skipped"] == {"missing_image": 1, "undecodable_image": 1, "empty_question": 1, "missing_field": 1}
    assert "question_id 990" in s["skip_examples"]["missing_image"][0]
    assert s["shards"] == ["vqav2-000000.tar"]


def test_vqav2_test_dev_without_annotations(tmp_path):
    images = tmp_path / "test2015"
    write_img(images / f"COCO_test2015_{5:012d}.jpg")
    q = write_json(tmp_path / "q.json", {"data_subtype": "test-dev2015", "questions": [
        {"image_id": 5, "question": "What is this?", "question_id": 50},
        {"image_id": 6, "question": "And this?", "question_id": 60}]})
    out = tmp_path / "out"
    C.convert_vqa(q, images, out, **OPTS)
    (sample,) = read_shards(out)
    rec = sample["record"]
    assert [m["role"] for m in rec["messages"]] == ["user"]
    assert rec["meta"] == {"dataset": "vqav2", "question_id": 50, "image_id": 5, "split": "test-dev2015"}
    assert summary(out)["skipped"] == {"missing_image": 1}


def test_vqav2_missing_annotation_is_skipped(tmp_path):
    q, a, images, _ = vqa_files(tmp_path)
    data = json.loads(a.read_text())
    data["annotations"] = [x for x in data["annotations"] if x["question_id"] != 421]
    write_json(a, data)
    C.convert_vqa(q, images, tmp_path / "out", annotations=a, **OPTS)
    assert summary(tmp_path / "out")["skipped"]["missing_annotation"] == 1


def test_okvqa_with_subtype_flag(tmp_path):
    q, a, images, _ = vqa_files(tmp_path, subtype="val2014", with_subtype=False, n_answers=5)
    with pytest.raises(ValueError, match="data_subtype"):
        C.convert_vqa(q, images, tmp_path / "bad", annotations=a, dataset="okvqa", **OPTS)
    out = tmp_path / "out"
    C.convert_vqa(q, images, out, annotations=a, subtype="val2014", dataset="okvqa", **OPTS)
    samples = read_shards(out)
    assert [s["key"] for s in samples] == ["okvqa_420", "okvqa_421", "okvqa_70"]
    assert samples[1]["record"]["meta"]["answers"] == ["yes"] * 5
    assert samples[1]["record"]["meta"]["dataset"] == "okvqa"
    assert list(out.glob("*.tar")) == [out / "okvqa-000000.tar"]


# ------------------------------------------------------------------------------------------------- TextVQA


def test_textvqa(tmp_path):
    images = tmp_path / "train_images"
    kept = write_img(images / "0054c91397f2fe05.jpg")
    write_img(images / "00685bc495504d61.jpg")
    write_corrupt(images / "bad0000000000000.jpg")

    def item(qid, image_id, question, answers):
        d = {"question_id": qid, "question": question, "image_id": image_id, "image_classes": ["Car"],
             "flickr_original_url": "https://example.com/x.jpg", "flickr_300k_url": "https://example.com/y.jpg",
             "image_width": 1024, "image_height": 768, "question_tokens": question.split(), "set_name": "val"}
        if answers is not None:
            d["answers"] = answers
        return d

    data = [item(1, "0054c91397f2fe05", "what brand?", ["nokia"] * 4 + ["nokia "] + ["samsung"] * 5),
            item(2, "00685bc495504d61", "what number?", ["12", "13"] * 5),  # tie: the first one seen wins
            item(3, "missing000000000", "what?", ["a"] * 10),
            item(4, "bad0000000000000", "what?", ["a"] * 10),
            item(5, "00685bc495504d61", "", ["a"] * 10)]
    ann = write_json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_version": "0.5.1",
                                                           "dataset_type": "val", "data": data})
    out = tmp_path / "out"
    C.convert_textvqa(ann, images, out, **OPTS)
    samples = read_shards(out)
    assert [s["key"] for s in samples] == ["textvqa_1", "textvqa_2"]
    rec = samples[0]["record"]
    assert rec["messages"][1] == {"role": "assistant", "content": "nokia"}  # 5 x "nokia" (one padded) > 5 x
    assert rec["meta"] == {"dataset": "textvqa", "question_id": 1, "image_id": "0054c91397f2fe05", "split": "val",
                           "answers": ["nokia"] * 4 + ["nokia "] + ["samsung"] * 5}
    assert samples[0]["images"] == {"0.jpg": kept}
    assert samples[1]["record"]["messages"][1]["content"] == "12"
    assert summary(out)["skipped"] == {"missing_image": 1, "undecodable_image": 1, "empty_question": 1}

    test = write_json(tmp_path / "TextVQA_0.5.1_test.json", {"dataset_name": "textvqa", "dataset_type": "test",
                                                             "data": [item(9, "0054c91397f2fe05", "what?", None)]})
    C.convert_textvqa(test, images, tmp_path / "test_out", **OPTS)
    (sample,) = read_shards(tmp_path / "test_out")
    assert [m["role"] for m in sample["record"]["messages"]] == ["user"]
    assert "answers" not in sample["record"]["meta"]


# -------------------------------------------------------------------------------------------------- DocVQA


def test_docvqa(tmp_path):
    split = tmp_path / "val"
    kept = write_img(split / "documents" / "pybv0228_81.png", fmt="PNG")
    write_corrupt(split / "documents" / "bad_1.png")

    def item(qid, image, question, answers):
        return {"questionId": qid, "question": question, "image": image, "docId": qid * 10,
                "ucsf_document_id": "pybv0228", "ucsf_document_page_no": "81", "answers": answers,
                "data_split": "val", "question_types": ["layout"]}

    data = [item(49153, "documents/pybv0228_81.png", "What is the date?", ["1/8/93", "January 8, 1993"]),
            item(49154, "documents/missing_1.png", "Who?", ["me"]),
            item(49155, "documents/bad_1.png", "Where?", ["here"]),
            item(49156, "documents/pybv0228_81.png", "Which?", [])]
    ann = write_json(split / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val",
                                               "dataset_version": "1.0", "data": data})
    out = tmp_path / "out"
    C.convert_docvqa(ann, out, **OPTS)  # images relative to the JSON's folder
    (sample,) = read_shards(out)
    rec = sample["record"]
    assert sample["key"] == "docvqa_49153"
    assert user_parts(rec)[0]["image_url"]["url"] == "0.png" and sample["images"] == {"0.png": kept}
    assert user_parts(rec)[1] == {"type": "text", "text": "What is the date?"}
    assert rec["messages"][1] == {"role": "assistant", "content": "1/8/93"}
    assert rec["meta"]["questionId"] == 49153 and rec["meta"]["docId"] == 491530
    assert rec["meta"]["answers"] == ["1/8/93", "January 8, 1993"]
    assert rec["meta"]["question_types"] == ["layout"]
    assert summary(out)["skipped"] == {"missing_image": 1, "undecodable_image": 1, "empty_answer": 1}


# ------------------------------------------------------------------------------------------------- ChartQA


def test_chartqa(tmp_path):
    root = tmp_path / "ChartQA Dataset"
    png = root / "test" / "png"
    kept = {name: write_img(png / name, fmt="PNG") for name in ("41699051005347.png", "two_col_1.png")}
    write_corrupt(png / "bad.png")
    write_json(root / "test" / "test_human.json", [
        {"imgname": "41699051005347.png", "query": "Which year is the highest?", "label": "2019"},
        {"imgname": "nope.png", "query": "What?", "label": "1"},
        {"imgname": "bad.png", "query": "What?", "label": "1"}])
    write_json(root / "test" / "test_augmented.json", [
        {"imgname": "two_col_1.png", "query": "What is the value of A?", "label": 3.5},
        {"imgname": "two_col_1.png", "query": "Empty label?", "label": ""}])
    out = tmp_path / "out"
    C.convert_chartqa(root, "test", out, **OPTS)
    samples = read_shards(out)
    assert [s["key"] for s in samples] == ["chartqa_test_human_000000", "chartqa_test_augmented_000000"]
    human, aug = (s["record"] for s in samples)
    assert human["messages"][1]["content"] == "2019" and aug["messages"][1]["content"] == "3.5"
    assert human["meta"] == {"dataset": "chartqa", "split": "test", "source": "human",
                             "imgname": "41699051005347.png", "answers": ["2019"]}
    assert aug["meta"]["source"] == "augmented"
    assert samples[1]["images"] == {"0.png": kept["two_col_1.png"]}
    assert summary(out)["skipped"] == {"missing_image": 1, "undecodable_image": 1, "empty_answer": 1}


# ------------------------------------------------------------------------------------------------ easy-VQA


def test_easy_vqa_from_the_package_reads_back_through_the_pipeline(tmp_path):
    out = tmp_path / "out"
    result = C.convert_easy_vqa(out, split="test", limit=6, shard_size=4, **OPTS)
    texts, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    samples = read_shards(out)
    assert [s["key"] for s in samples] == [f"easy_vqa_test-{i}" for i in range(6)]
    rec = samples[0]["record"]
    assert user_parts(rec) == [{"type": "image_url", "image_url": {"url": "0.png", "detail": "low"}},
                               {"type": "text", "text": texts[0]}]
    assert rec["messages"][1] == {"role": "assistant", "content": answers[0]}
    assert rec["meta"] == {"dataset": "easy_vqa", "question_id": "test-0", "image_id": image_ids[0], "split": "test",
                           "answers": [answers[0]], "question_type": official.EASY_VQA_TYPE_OF[answers[0]]}
    for i, s in enumerate(samples):  # the package's PNG bytes, unchanged
        assert s["images"] == {"0.png": Path(paths[image_ids[i]]).read_bytes()}
    assert result["written"] == 6 and result["source_items"] == 9673 and result["skipped_total"] == 0
    assert result["shards"] == ["easy_vqa-000000.tar", "easy_vqa-000001.tar"]

    cfg = model_config()
    proc = Processor(cfg, build_tokenizer(cfg.lm))
    stream = ShardStream(out, proc, epochs=1, shuffle_shards=False, shuffle_buffer=0, strict=True)
    loader = torch.utils.data.DataLoader(stream, batch_size=3, collate_fn=functools.partial(
        collate_stream, pad_token_id=proc.tokenizer.pad_token_id))
    batches = list(loader)
    assert [k for b in batches for k in b["keys"]] == [s["key"] for s in samples]
    assert all(b["views_per_image"].tolist() == [1, 1, 1] for b in batches)  # 64x64, detail low: one global view
    supervised = [proc.tokenizer.decode(row[row != -100]) for b in batches for row in b["labels"]]
    assert supervised == [f" {a}</s>" for a in answers[:6]]  # the assistant turn only


def test_easy_vqa_copy_of_the_data_skips_bad_items(tmp_path):
    root = tmp_path / "data"
    (root / "train/images").mkdir(parents=True)
    shutil.copy(official.easy_vqa_root() / "train/images/0.png", root / "train/images/0.png")
    write_corrupt(root / "train/images/1.png")
    write_json(root / "train/questions.json", [
        ["what is the shape?", "circle", 0], ["what colour?", "purple", 0], ["is it red?", "yes", 7],
        ["is it red?", "no", 1], [" ", "yes", 0], ["what?"], ["is there a circle?", "yes", 0]])
    out = tmp_path / "out"
    C.convert_easy_vqa(out, root=root, detail="high", **OPTS)
    samples = read_shards(out)
    assert [s["key"] for s in samples] == ["easy_vqa_train-0", "easy_vqa_train-6"]
    assert user_parts(samples[0]["record"])[0]["image_url"]["detail"] == "high"
    assert [s["record"]["meta"]["question_type"] for s in samples] == ["shape", "yes/no"]
    assert summary(out)["skipped"] == {"unknown_answer": 1, "missing_image": 1, "undecodable_image": 1,
                                       "empty_question": 1, "malformed_item": 1}


# -------------------------------------------------------------------------------------------- COCO captions


def test_coco_captions(tmp_path):
    images = tmp_path / "val2017"
    kept = write_img(images / "000000000139.jpg")
    write_img(images / "000000000285.jpg")
    write_corrupt(images / "000000000632.jpg")
    cap = write_json(tmp_path / "captions_val2017.json", {
        "info": {}, "licenses": [],
        "images": [{"id": 139, "file_name": "000000000139.jpg", "width": 8, "height": 6},
                   {"id": 285, "file_name": "000000000285.jpg", "width": 8, "height": 6},  # no captions
                   {"id": 724, "file_name": "000000000724.jpg", "width": 8, "height": 6},  # missing
                   {"id": 632, "file_name": "000000000632.jpg", "width": 8, "height": 6}],  # corrupt
        "annotations": [{"id": 20, "image_id": 139, "caption": "A room with a TV. "},
                        {"id": 5, "image_id": 139, "caption": "A living room."},
                        {"id": 9, "image_id": 724, "caption": "A sign."},
                        {"id": 11, "image_id": 632, "caption": "A bed."}]})
    out = tmp_path / "out"
    C.convert_coco_captions(cap, images, out, **OPTS)
    (sample,) = read_shards(out)
    rec = sample["record"]
    assert sample["key"] == "coco_captions_139" and sample["images"] == {"0.jpg": kept}
    assert user_parts(rec)[1] == {"type": "text", "text": C.CAPTION_PROMPT}
    assert rec["messages"][1] == {"role": "assistant", "content": "A living room."}  # lowest annotation id
    assert rec["meta"]["answers"] == ["A living room.", "A room with a TV."]
    assert rec["meta"]["image_id"] == 139
    assert summary(out)["skipped"] == {"no_captions": 1, "missing_image": 1, "undecodable_image": 1}


# --------------------------------------------------------------------------------------------------- LLaVA


def test_llava(tmp_path):
    images = tmp_path / "images"
    jpg = write_img(images / "000000033471.jpg")
    webp = write_img(images / "sub" / "a.webp", fmt="WEBP")
    write_img(images / "b.gif", fmt="GIF")
    write_corrupt(images / "bad.jpg")
    H, G = "human", "gpt"
    data = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": H, "value": "<image>\nWhat is in the picture?"}, {"from": G, "value": "A red square."},
            {"from": H, "value": "Sure?"}, {"from": G, "value": "Yes."}]},
        {"id": "text.only.1", "conversations": [
            {"from": "system", "value": "Be brief."}, {"from": H, "value": "Hi"}, {"from": G, "value": "Hello."}]},
        {"id": "mid", "image": "sub/a.webp", "conversations": [
            {"from": H, "value": "Look at\n<image>\nand tell me the colour."}, {"from": G, "value": "Red."}]},
        {"id": "gif", "image": "b.gif", "conversations": [
            {"from": H, "value": "What colour?"}, {"from": G, "value": "Red."}]},  # no marker: image first
        {"id": "missing", "image": "nope.jpg", "conversations": [
            {"from": H, "value": "<image>\nWhat?"}, {"from": G, "value": "X"}]},
        {"id": "bad", "image": "bad.jpg", "conversations": [
            {"from": H, "value": "<image>\nWhat?"}, {"from": G, "value": "X"}]},
        {"id": "two-markers", "image": "000000033471.jpg", "conversations": [
            {"from": H, "value": "<image> <image>"}, {"from": G, "value": "X"}]},
        {"id": "role", "conversations": [{"from": "robot", "value": "beep"}]},
    ]
    ann = write_json(tmp_path / "llava_instruct.json", data)
    out = tmp_path / "out"
    C.convert_llava(ann, out, images=images, **OPTS)
    samples = {s["record"]["meta"]["id"]: s for s in read_shards(out)}
    assert list(samples) == ["000000033471", "text.only.1", "mid", "gif"]

    first = samples["000000033471"]
    assert first["key"] == "llava_00000000_000000033471"
    msgs = first["record"]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == [{"type": "image_url", "image_url": {"url": "0.jpg", "detail": "auto"}},
                                  {"type": "text", "text": "What is in the picture?"}]
    assert msgs[1]["content"] == "A red square." and msgs[2]["content"] == [{"type": "text", "text": "Sure?"}]
    assert first["images"] == {"0.jpg": jpg}
    assert first["record"]["meta"] == {"dataset": "llava", "id": "000000033471", "image": "000000033471.jpg"}

    text = samples["text.only.1"]
    assert text["key"] == "llava_00000001_text-only-1" and text["images"] == {}
    assert [m["role"] for m in text["record"]["messages"]] == ["system", "user", "assistant"]
    assert text["record"]["messages"][0]["content"] == "Be brief."

    mid = samples["mid"]
    assert [p["type"] for p in user_parts(mid["record"])] == ["text", "image_url", "text"]
    assert user_parts(mid["record"])[0]["text"] == "Look at"
    assert user_parts(mid["record"])[2]["text"] == "and tell me the colour."
    assert mid["images"] == {"0.webp": webp}  # webp kept as is

    gif = samples["gif"]
    assert [p["type"] for p in user_parts(gif["record"])] == ["image_url", "text"]
    assert list(gif["images"]) == ["0.png"]  # GIF re-encoded to PNG
    assert Image.open(io.BytesIO(gif["images"]["0.png"])).format == "PNG"

    assert summary(out)["skipped"] == {"missing_image": 1, "undecodable_image": 1, "image_marker_mismatch": 1,
                                       "unknown_role": 1}


def test_prepare_image_formats():
    png = img_bytes("PNG")
    assert C.prepare_image(png, "x.png") == ("png", png)
    assert C.prepare_image(png, "x.jpg") == ("png", png)  # extension follows the content
    jpg = img_bytes("JPEG")
    assert C.prepare_image(jpg, "x.JPEG") == ("jpeg", jpg)
    ext, data = C.prepare_image(img_bytes("BMP"), "x.bmp")
    assert ext == "png" and Image.open(io.BytesIO(data)).size == (8, 6)
    with pytest.raises(C.ImageError):
        C.prepare_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "x.svg")


# ------------------------------------------------------------------------------------- driver: resume, limit


def tar_members(out: Path) -> dict[str, list[tuple[str, bytes]]]:
    result = {}
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as tf:
            # every header field but mtime (webdataset stamps the wall clock), and the data
            result[p.name] = [(m.name, m.size, m.mode, m.uname, m.gname, m.uid, m.gid, tf.extractfile(m).read())
                              for m in tf.getmembers()]
    return result


def test_resume_after_interruption_matches_clean_run(tmp_path):
    q, a, images, _ = vqa_files(tmp_path)
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    C.convert_vqa(q, images, clean, annotations=a, shard_size=2, **OPTS)

    # 5 items: shard 0 (items 0-1) completed; item 2 written into an open shard 1; items 3-4 skipped.
    with pytest.raises(C.InjectedFailure):
        C.convert_vqa(q, images, resumed, annotations=a, shard_size=2, fail_after=5, **OPTS)
    progress = json.loads((resumed / "progress.json").read_text())
    assert [(s["first_item"], s["end_item"], s["count"]) for s in progress["shards"]] == [(0, 2, 2)]
    assert progress["next_item"] == 2 and not progress["done"]
    assert (resumed / "vqav2-000001.tar").exists()  # the partial shard
    assert not (resumed / "summary.json").exists()

    # A second interruption right away, then a full rerun.
    with pytest.raises(C.InjectedFailure):
        C.convert_vqa(q, images, resumed, annotations=a, shard_size=2, fail_after=0, **OPTS)
    result = C.convert_vqa(q, images, resumed, annotations=a, shard_size=2, **OPTS)

    assert tar_members(resumed) == tar_members(clean)
    assert sorted(tar_members(clean)) == ["vqav2-000000.tar", "vqav2-000001.tar"]
    assert read_shards(resumed) == read_shards(clean)
    assert summary(resumed) == summary(clean) == result
    assert result["skipped_total"] == 4 and result["written"] == 3
    final = json.loads((resumed / "progress.json").read_text())
    assert [(s["first_item"], s["end_item"], s["count"]) for s in final["shards"]] == [(0, 2, 2), (2, 7, 1)]
    assert final["done"]

    # A finished conversion reruns as a no-op; other arguments are refused unless overwrite.
    before = {p.name: p.stat().st_mtime_ns for p in resumed.glob("*.tar")}
    C.convert_vqa(q, images, resumed, annotations=a, shard_size=2, **OPTS)
    assert {p.name: p.stat().st_mtime_ns for p in resumed.glob("*.tar")} == before
    with pytest.raises(ValueError, match="other arguments"):
        C.convert_vqa(q, images, resumed, annotations=a, shard_size=3, **OPTS)
    C.convert_vqa(q, images, resumed, annotations=a, shard_size=3, overwrite=True, **OPTS)
    assert sorted(p.name for p in resumed.glob("*.tar")) == ["vqav2-000000.tar"]


def test_existing_shards_without_progress_are_refused(tmp_path):
    q, a, images, _ = vqa_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "vqav2-000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="no progress.json"):
        C.convert_vqa(q, images, out, annotations=a, **OPTS)


def test_limit(tmp_path):
    q, a, images, _ = vqa_files(tmp_path)
    out = tmp_path / "out"
    result = C.convert_vqa(q, images, out, annotations=a, limit=4, **OPTS)
    assert [s["key"] for s in read_shards(out)] == ["vqav2_420", "vqav2_421", "vqav2_70"]
    assert result["items"] == 4 and result["skipped"] == {"missing_image": 1}


def test_make_key():
    assert C.make_key("llava", "00000001", "a.b/c d") == "llava_00000001_a-b-c-d"
    assert len(C.make_key("x", "y" * 500)) == 2 + 64


# ------------------------------------------------------------------------------------------------------ CLI


def load_cli():
    spec = importlib.util.spec_from_file_location("data_convert_cli", REPO / "data" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_vqav2(tmp_path, capsys):
    cli = load_cli()
    q, a, images, _ = vqa_files(tmp_path)
    out = tmp_path / "out"
    argv = ["vqav2", "--questions", str(q), "--annotations", str(a), "--images", str(images), "--out", str(out),
            "--detail", "high", "--no-progress"]
    assert cli.main([*argv, "--shard-size", "2"]) == 0
    samples = read_shards(out)
    assert len(samples) == 3 and sorted(p.name for p in out.glob("*.tar")) == ["vqav2-000000.tar",
                                                                              "vqav2-000001.tar"]
    assert user_parts(samples[0]["record"])[0]["image_url"]["detail"] == "high"
    assert "wrote 3 samples" in capsys.readouterr().out
    assert cli.main([*argv, "--shard-size", "3"]) == 1  # other arguments, same --out: refused
    assert "other arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["vqav2", "--out", str(out)])  # --questions missing


def test_cli_easy_vqa(tmp_path, capsys, monkeypatch):
    cli = load_cli()
    out = tmp_path / "out"
    assert cli.main(["easy-vqa", "--out", str(out), "--limit", "3", "--no-progress"]) == 0  # train, the package's
    samples = read_shards(out)
    assert [s["key"] for s in samples] == ["easy_vqa_train-0", "easy_vqa_train-1", "easy_vqa_train-2"]
    assert user_parts(samples[0]["record"])[0]["image_url"]["detail"] == "low"
    assert "wrote 3 samples" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "easy_vqa", None)  # as if not installed
    assert cli.main(["easy-vqa", "--out", str(tmp_path / "other"), "--no-progress"]) == 1
    assert "pip install --no-deps easy-vqa==1.0" in capsys.readouterr().err


def test_cli_other_subcommands_parse(tmp_path):
    parser = load_cli().build_parser()
    args = parser.parse_args(["chartqa", "--root", "r", "--split", "val", "--out", "o", "--limit", "5"])
    assert (args.dataset, args.split, args.limit, args.sources) == ("chartqa", "val", 5, ["human", "augmented"])
    args = parser.parse_args(["coco-captions", "--captions", "c.json", "--images", "i", "--out", "o"])
    assert args.prompt == C.CAPTION_PROMPT
    for argv in (["textvqa", "--annotations", "a", "--images", "i", "--out", "o"],
                 ["docvqa", "--annotations", "a", "--out", "o"],
                 ["llava", "--annotations", "a", "--out", "o", "--name", "sharegpt4v"],
                 ["okvqa", "--questions", "q", "--images", "i", "--out", "o", "--subtype", "val2014"],
                 ["easy-vqa", "--root", "r", "--split", "test", "--out", "o", "--detail", "auto"]):
        assert parser.parse_args(argv).dataset == argv[0]


def test_synthetic_video_answers_need_the_frames_order():
    """The shape really moves the way the answer says (its coloured pixels' centroid, frame by frame), and the first
    and last words differ: the reversed clip, the same set of frames, has every answer changed."""
    import numpy as np

    from vlm.data.convert.synthetic_video import render_clip

    for seed in range(6):
        frames, answers = render_clip(np.random.default_rng(seed), frames=4, size=128)
        assert len(frames) == 4 and frames[0].size == (128, 128) and answers["first"] != answers["last"]
        xs = []
        for f in frames:
            rgb = np.asarray(f).astype(int)
            shape = rgb.max(-1) - rgb.min(-1) > 90  # saturated: the shape (background and words are grey)
            xs.append(np.nonzero(shape)[1].mean())
        steps = np.diff(xs)
        assert (steps > 0).all() if answers["motion"] == "right" else (steps < 0).all()
    again, same = render_clip(np.random.default_rng(5), frames=4, size=128)  # the last seed again: the same clip
    assert same == answers and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again, frames))
