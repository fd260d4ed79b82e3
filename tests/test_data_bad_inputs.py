"""Bad input: named in an error (on_bad_sample="error"), or left out and counted ("skip")."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from mmtransfer.data import DataError, load, load_with_report, open_image, validate

try:
    from data_helpers import (
        exif_rotated_jpeg,
        garbage_file,
        load_repo_module,
        png_with_size,
        preprocessor,
        save_image,
        truncated_png,
        write_csv,
        write_jsonl,
    )
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import (
        exif_rotated_jpeg,
        garbage_file,
        load_repo_module,
        png_with_size,
        preprocessor,
        save_image,
        truncated_png,
        write_csv,
        write_jsonl,
    )


def folder_with(tmp_path, bad_name: str, make_bad) -> "tuple":
    """An imagefolder with two good images and one bad one (line 3 of metadata.jsonl)."""
    root = tmp_path / "imgs"
    save_image(root / "good1.png")
    save_image(root / "good2.png")
    make_bad(root / bad_name)
    write_jsonl(root / "metadata.jsonl", [
        {"file_name": "good1.png", "text": "one"},
        {"file_name": "good2.png", "text": "two"},
        {"file_name": bad_name, "text": "three"},
    ])
    return root


def assert_named_then_skipped(root, file: str, where: str, reason: str, **options) -> None:
    with pytest.raises(DataError) as err:
        load(root, **options)
    message = str(err.value)
    assert file in message and where in message, message
    assert reason in message, message
    assert "on_bad_sample='skip'" in message  # says what to do
    out = load_with_report(root, on_bad_sample="skip", **options)
    assert out.report.skipped == 1 and len(out.report.problems) == 1
    assert file in str(out.report.problems[0])
    assert len(out.dataset) == 2


# ----------------------------------------------------------------------------- broken files


def test_unreadable_file(tmp_path):
    root = folder_with(tmp_path, "bad.png", garbage_file)
    assert_named_then_skipped(root, "bad.png", "metadata.jsonl line 3", "cannot identify it as an image")


def test_truncated_file(tmp_path):
    root = folder_with(tmp_path, "cut.png", truncated_png)
    assert_named_then_skipped(root, "cut.png", "metadata.jsonl line 3", "truncated")


def test_truncated_file_passes_header_check_but_not_full(tmp_path):
    root = folder_with(tmp_path, "cut.png", truncated_png)
    assert len(load(root, verify="header")) == 3  # documented: header checks cannot see truncation
    with pytest.raises(DataError, match="cut.png"):
        load(root, verify="full")


def test_zero_byte_file(tmp_path):
    root = folder_with(tmp_path, "empty.png", lambda p: p.write_bytes(b""))
    assert_named_then_skipped(root, "empty.png", "metadata.jsonl line 3", "0 bytes")


def test_row_naming_a_missing_file(tmp_path):
    root = folder_with(tmp_path, "gone.png", lambda p: None)
    assert_named_then_skipped(root, "gone.png", "metadata.jsonl line 3", "does not exist")


def test_decompression_bomb_warning_is_an_error(tmp_path):
    limit_before = Image.MAX_IMAGE_PIXELS
    # 10000 x 10000 = 1e8 pixels: above MAX_IMAGE_PIXELS (~8.9e7), where PIL only warns.
    root = folder_with(tmp_path, "bomb.png", lambda p: png_with_size(p, 10_000, 10_000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning leaks out either
        assert_named_then_skipped(root, "bomb.png", "metadata.jsonl line 3", "MAX_IMAGE_PIXELS")
    assert Image.MAX_IMAGE_PIXELS == limit_before  # the global limit is untouched


def test_decompression_bomb_error(tmp_path):
    root = folder_with(tmp_path, "huge.png", lambda p: png_with_size(p, 30_000, 30_000))
    assert_named_then_skipped(root, "huge.png", "metadata.jsonl line 3", "decompression bomb")


# ----------------------------------------------------------------------------- captions, columns, labels


def test_empty_and_null_captions(tmp_path):
    root = tmp_path / "imgs"
    for name in ("a.png", "b.png", "c.png"):
        save_image(root / name)
    write_jsonl(root / "metadata.jsonl", [
        {"file_name": "a.png", "text": "fine"},
        {"file_name": "b.png", "text": None},
        {"file_name": "c.png", "text": "   "},
        {"file_name": "a.png", "text": ""},
    ])
    with pytest.raises(DataError) as err:
        load(root)
    text = str(err.value)
    assert "metadata.jsonl line 2 (b.png): the caption is missing (null)" in text
    assert "metadata.jsonl line 3 (c.png): the caption is empty" in text
    out = load_with_report(root, on_bad_sample="skip")
    assert out.report.skipped == 3  # three bad caption rows
    assert len(out.dataset) == 1 and out.dataset[0]["captions"] == ["fine"]  # a.png keeps its good caption


def test_empty_caption_cell_in_csv(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    table = write_csv(tmp_path / "caps.csv", ["file_name", "text"], [["a.png", "ok"], ["b.png", ""]])
    with pytest.raises(DataError, match=r"caps.csv line 3 \(b.png\): the caption is empty"):
        load(table)
    assert load_with_report(table, on_bad_sample="skip").report.skipped == 1


def test_missing_columns(tmp_path):
    save_image(tmp_path / "a.png")
    table = write_csv(tmp_path / "caps.csv", ["file_name", "words"], [["a.png", "hello"]])
    with pytest.raises(DataError, match="no caption column.*file_name, words.*caption_column"):
        load(table)
    with pytest.raises(DataError, match="no caption column 'text'.*file_name, words"):
        load(table, caption_column="text")
    with pytest.raises(DataError, match="no image column 'path'"):
        load(table, image_column="path", caption_column="words")
    saved = Dataset.from_dict({"x": [1]})
    saved.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match="no image column"):
        load(tmp_path / "saved")


def test_labels_outside_the_class_list(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        save_image(tmp_path / name)
    table = write_csv(tmp_path / "caps.csv", ["file_name", "text", "label"], [["a.png", "x", "cat"], ["b.png", "y", "dog"], ["c.png", "z", "cow"]])
    with pytest.raises(DataError, match=r"caps.csv line 4 \(c.png\): label 'cow' is not one of the 2 class names"):
        load(table, class_names=["cat", "dog"])
    out = load_with_report(table, class_names=["cat", "dog"], on_bad_sample="skip")
    assert out.report.skipped == 1 and len(out.dataset) == 2


def test_integer_labels_outside_the_class_list(tmp_path):
    paths = [str(save_image(tmp_path / f"{i}.png")) for i in range(3)]
    Dataset.from_dict({"image": paths, "caption": ["a", "b", "c"], "label": [0, 7, 1]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"row 1: label 7 is outside the class list \(0..2, 3 classes\)"):
        load(tmp_path / "saved", class_names=["x", "y", "z"])
    assert load_with_report(tmp_path / "saved", class_names=["x", "y", "z"], on_bad_sample="skip").report.skipped == 1


def test_npz_labels_outside_the_class_list(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 5, 1]))
    with pytest.raises(DataError, match=r"d.npz index 1: label 5 is outside the class list"):
        load(tmp_path / "d.npz", class_names=["a", "b"])
    out = load_with_report(tmp_path / "d.npz", class_names=["a", "b"], on_bad_sample="skip")
    assert out.report.skipped == 1 and out.dataset["label"] == [0, 1]


def test_skip_logs_count_and_first_names(tmp_path, caplog):
    root = folder_with(tmp_path, "bad.png", garbage_file)
    with caplog.at_level(logging.WARNING, logger="mmtransfer.data"):
        load(root, on_bad_sample="skip")
    assert "Skipped 1 bad sample(s)" in caplog.text and "bad.png" in caplog.text


# ----------------------------------------------------------------------------- image modes and EXIF


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_image_modes_become_rgb(tmp_path, mode):
    path = save_image(tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}", mode=mode, size=(8, 8))
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": path.name, "text": mode}])
    ds = load(tmp_path)
    rgb = open_image(ds.cast_column("image", ImageFeature(decode=False))[0]["image"])
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    pixels = preprocessor(8)([ds[0]["image"]])  # (1, 3, 8, 8) in [0, 1]
    assert pixels.shape == (1, 3, 8, 8)
    if mode in ("LA", "RGBA"):  # fully transparent: composited on white
        assert pixels.min().item() == pytest.approx(1.0)
    if mode == "P":  # left half transparent -> white, right half blue
        assert pixels[0, :, :, 0].min().item() == pytest.approx(1.0)
        assert pixels[0, :, 0, 7].tolist() == pytest.approx([0.0, 0.0, 1.0])
    if mode == "I;16":  # 40000 / 65535 of full scale
        assert pixels.mean().item() == pytest.approx(40000 / 65535, abs=0.01)


@pytest.mark.parametrize("mode,key", [("L", 0), ("RGB", (0, 0, 0))])
def test_colour_key_transparency_becomes_white(tmp_path, mode, key):
    # PNG tRNS colour keys on L and RGB images (not only palettes) mark transparent pixels.
    path = tmp_path / "keyed.png"
    Image.new(mode, (6, 6), key).save(path, transparency=key)
    assert open_image(str(path)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotated_photo(tmp_path):
    exif_rotated_jpeg(tmp_path / "photo.jpg")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "photo.jpg", "text": "a rotated photo"}])
    ds = load(tmp_path)
    assert ds[0]["image"].size == (20, 40)  # upright: portrait
    upright = open_image(str(tmp_path / "photo.jpg"))
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[2, 10], np.asarray(upright)[37, 10]
    assert top[0] > 200 and top[2] < 60  # red half on top after rotating 90 degrees clockwise
    assert bottom[2] > 200 and bottom[0] < 60


# ----------------------------------------------------------------------------- validate


def test_validate_reports_every_problem(tmp_path):
    root = tmp_path / "imgs"
    save_image(root / "ok.png")
    garbage_file(root / "bad.png")
    (root / "empty.png").write_bytes(b"")
    write_jsonl(root / "metadata.jsonl", [
        {"file_name": "ok.png", "text": "fine"},
        {"file_name": "bad.png", "text": "b"},
        {"file_name": "empty.png", "text": "c"},
        {"file_name": "missing.png", "text": "d"},
        {"file_name": "ok.png", "text": None},
    ])
    report = validate(root)
    assert not report.ok and len(report.problems) == 4
    text = str(report)
    for needle in ("bad.png", "empty.png", "missing.png", "metadata.jsonl line 5", "problems:       4"):
        assert needle in text
    assert report.checked_images == 3
    assert report.to_dict()["problems"][0]["reason"]


def test_validate_a_dataset_object(tmp_path):
    from datasets import Image as ImageFeature
    from datasets import List

    paths = [str(save_image(tmp_path / "a.png")), str(garbage_file(tmp_path / "b.png"))]
    ds = Dataset.from_dict({"image": paths, "captions": [["x"], []], "label": [0, 3]},
                           features=Features({"image": ImageFeature(), "captions": List(Value("string")), "label": Value("int64")}))
    report = validate(ds, class_names=["p", "q"])
    reasons = " | ".join(str(p) for p in report.problems)
    assert "row 1" in reasons and "caption list is empty" in reasons and "cannot identify" in reasons
    assert "label 3 is outside the class list" in reasons


def test_validate_script_exit_codes(tmp_path, capsys):
    script = load_repo_module("scripts/validate_data.py")
    good = tmp_path / "good"
    save_image(good / "a.png")
    write_jsonl(good / "metadata.jsonl", [{"file_name": "a.png", "text": "fine"}])
    assert script.main([str(good)]) == 0
    bad = folder_with(tmp_path, "bad.png", garbage_file)
    assert script.main([str(bad)]) == 1
    assert "bad.png" in capsys.readouterr().out
    assert script.main([str(tmp_path / "nowhere")]) == 2
    assert "Built-in sets" in capsys.readouterr().err


def test_collator_names_a_file_that_went_bad_after_loading(tmp_path):
    from mmtransfer.data import LabelCollator, make_loader

    root = folder_with(tmp_path, "later.png", save_image)
    ds = load(root)
    garbage_file(root / "later.png")  # broken after the load-time check
    loader = make_loader(ds, LabelCollator(preprocessor(), require_labels=False), batch_size=3)
    with pytest.raises(DataError, match="later.png.*validate_data.py"):
        next(iter(loader))


# ----------------------------------------------------------------------------- paths outside the data set folder


def _outside_reason(reason: str) -> bool:
    return reason.startswith("the path leads outside the data set folder")


def test_table_rows_leading_outside_the_folder_are_bad_samples(tmp_path):
    root = tmp_path / "imgs"
    save_image(root / "good1.png")
    save_image(root / "good2.png")
    secret = save_image(tmp_path / "secret.png")
    (root / "link.png").symlink_to(secret)
    write_jsonl(root / "metadata.jsonl", [
        {"file_name": "good1.png", "text": "one"},
        {"file_name": "../secret.png", "text": "up and out"},
        {"file_name": str(secret), "text": "absolute"},
        {"file_name": "link.png", "text": "a link out"},
        {"file_name": "../no-such-file.png", "text": "nothing there"},
        {"file_name": "good2.png", "text": "two"},
    ])
    with pytest.raises(DataError) as err:
        load(root)
    message = str(err.value)
    assert "metadata.jsonl line 2 (../secret.png): the path leads outside the data set folder" in message
    assert "allow_outside_root=True" in message
    out = load_with_report(root, on_bad_sample="skip")
    assert len(out.dataset) == 2 and out.report.skipped == 4
    assert [p.where for p in out.report.problems] == [f"metadata.jsonl line {i}" for i in (2, 3, 4, 5)]
    assert all(_outside_reason(p.reason) for p in out.report.problems)
    # Whether something exists out there makes no difference to what the user is told.
    assert len({p.reason for p in out.report.problems}) == 1
    # The option reads them (the missing one is then reported as missing).
    opened = load_with_report(root, on_bad_sample="skip", allow_outside_root=True)
    assert len(opened.dataset) == 4 and opened.report.skipped == 1
    assert "does not exist" in opened.report.problems[0].reason


def test_image_root_is_the_folder_paths_must_stay_in(tmp_path):
    pictures = tmp_path / "pictures"
    save_image(pictures / "x.png")
    save_image(tmp_path / "elsewhere" / "y.png")
    table = write_csv(tmp_path / "tables" / "caps.csv", ["file_name", "text"], [["x.png", "in"], ["../elsewhere/y.png", "out"]])
    out = load_with_report(table, image_root=str(pictures), on_bad_sample="skip")
    assert len(out.dataset) == 1 and out.report.skipped == 1
    assert out.report.problems[0].where == "caps.csv line 3" and _outside_reason(out.report.problems[0].reason)
    assert str(pictures) in out.report.problems[0].reason


def test_class_folders_do_not_follow_links_leading_outside(tmp_path):
    outside = tmp_path / "outside"
    save_image(outside / "dog1.png")
    save_image(outside / "dog2.png")
    secret = save_image(tmp_path / "secret.png")
    root = tmp_path / "pets"
    save_image(root / "cat" / "a.png")
    save_image(root / "cat" / "b.png")
    (root / "cat" / "link.png").symlink_to(secret)
    (root / "dog").symlink_to(outside, target_is_directory=True)
    (root / "cat" / "nested").symlink_to(outside, target_is_directory=True)  # never walked
    with pytest.raises(DataError) as err:
        load(root)
    message = str(err.value)
    assert "dog/: the path leads outside" in message and "move the class folder" in message
    assert "cat/link.png: the path leads outside" in message
    out = load_with_report(root, on_bad_sample="skip")
    assert sorted(out.dataset["image_id"]) == [0, 1] and out.report.skipped == 2
    assert out.dataset.features["label"].names == ["cat"]
    # A link that stays inside the folder is fine.
    (root / "kitty").symlink_to(root / "cat", target_is_directory=True)
    assert load_with_report(root, on_bad_sample="skip").dataset.features["label"].names == ["cat", "kitty"]
    opened = load(root, allow_outside_root=True)
    assert opened.features["label"].names == ["cat", "dog", "kitty"] and len(opened) == 3 + 2 + 3


def test_only_linked_class_folders_is_an_error(tmp_path):
    save_image(tmp_path / "outside" / "a.png")
    (tmp_path / "pets").mkdir()
    (tmp_path / "pets" / "dog").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(DataError, match="Every class folder of .* is a link leading outside it.*allow_outside_root=True"):
        load_with_report(tmp_path / "pets", on_bad_sample="skip")


def test_split_folder_linked_outside_is_refused(tmp_path):
    save_image(tmp_path / "outside" / "cat" / "a.png")
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "train").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(DataError, match="split folder .*train is a link leading outside"):
        load(tmp_path / "set", split="train")
    assert len(load(tmp_path / "set", split="train", allow_outside_root=True)) == 1


# ----------------------------------------------------------------------------- tables that are not UTF-8


def _latin1_folder(tmp_path, table: str) -> "tuple":
    """Three images; the table's second row holds 'café' written as Latin-1 (the byte 0xe9)."""
    root = tmp_path / "imgs"
    for name in ("a.png", "b.png", "c.png"):
        save_image(root / name)
    if table == "metadata.jsonl":
        body = b'{"file_name": "a.png", "text": "tea"}\n{"file_name": "b.png", "text": "caf\xe9"}\n{"file_name": "c.png", "text": "milk"}\n'
        where = "metadata.jsonl line 2"
    else:  # with a byte-order mark, which is still fine
        body = b"\xef\xbb\xbffile_name,text\na.png,tea\nb.png,caf\xe9\nc.png,milk\n"
        where = "metadata.csv line 3"
    (root / table).write_bytes(body)
    return root, where


@pytest.mark.parametrize("table", ["metadata.jsonl", "metadata.csv"])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, table):
    root, where = _latin1_folder(tmp_path, table)
    with pytest.raises(DataError) as err:
        load(root)
    message = str(err.value)
    assert f"{where}: it holds the byte 0xe9, which is not UTF-8 text; save the table as UTF-8" in message
    assert "on_bad_sample='skip'" in message
    out = load_with_report(root, on_bad_sample="skip")
    assert out.report.skipped == 1 and sorted(c for caps in out.dataset["captions"] for c in caps) == ["milk", "tea"]
    report = validate(root)  # lists it, never raises
    assert not report.ok and [p.where for p in report.problems] == [where]


def test_bytes_that_are_not_utf8_in_a_json_list(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png")
    (tmp_path / "rows.json").write_bytes(b'[{"image": "a.png", "caption": "tea"}, {"image": "b.png", "caption": "caf\xe9"}]')
    out = load_with_report(tmp_path / "rows.json", on_bad_sample="skip")
    assert len(out.dataset) == 1 and out.report.problems[0].where == "rows.json item 1"
    assert "0xe9, which is not UTF-8" in out.report.problems[0].reason


def test_validate_script_on_tables_that_are_not_utf8(tmp_path, capsys):
    script = load_repo_module("scripts/validate_data.py")
    root, where = _latin1_folder(tmp_path, "metadata.csv")
    assert script.main([str(root)]) == 1  # a bad row: listed with the other bad samples
    out = capsys.readouterr()
    assert f"{where}: it holds the byte 0xe9" in out.out and "Traceback" not in out.err
    (root / "metadata.csv").write_bytes(b"file_name,l\xe9gende\na.png,tea\n")
    assert script.main([str(root)]) == 2  # no readable header: the table cannot be read at all
    err = capsys.readouterr().err
    assert "metadata.csv line 1 (the header): it holds the byte 0xe9, which is not UTF-8 text" in err
