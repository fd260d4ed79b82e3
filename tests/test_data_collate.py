"""Collators, paired source/target loading and retrieval flattening."""

from __future__ import annotations

import pickle

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, List, Value
from torch.utils.data import DataLoader

from mmtransfer.data import (
    CaptionCollator,
    DataError,
    LabelCollator,
    PairedLoader,
    make_loader,
    retrieval_set,
    undecoded,
)
from mmtransfer.models.preprocess import AugmentConfig

try:
    from data_helpers import preprocessor, save_image, tokenizer
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import preprocessor, save_image, tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """12 images, 3 captions each, labels 0..2."""
    root = tmp_path_factory.mktemp("captioned")
    paths = [str(save_image(root / f"{i}.png", color=(20 * i, 100, 200 - 10 * i))) for i in range(12)]
    return Dataset.from_dict(
        {
            "image": paths,
            "captions": [[f"picture number {i}", f"image {i} variant", f"a long caption about image {i} " * 20] for i in range(12)],
            "label": [i % 3 for i in range(12)],
            "image_id": list(range(100, 112)),
        },
        features=Features({"image": Image(), "captions": List(Value("string")), "label": ClassLabel(names=["a", "b", "c"]), "image_id": Value("int64")}),
    )


def test_caption_collator_shapes_and_eval_picks_first(tok, captioned):
    collate = CaptionCollator(tok, preprocessor(32), max_length=16)
    batch = collate([captioned[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 4
    assert batch["input_ids"].shape[1] <= 16
    assert batch["image_index"].tolist() == [100, 101, 102, 103]
    assert tok.decode(batch["input_ids"][1], skip_special_tokens=True) == "picture number 1"


def test_caption_collator_truncates_and_pads_to_max_length(tok, captioned):
    batch = CaptionCollator(tok, preprocessor(32), max_length=12, pad_to_max_length=True)([captioned[0]])
    assert batch["input_ids"].shape == (1, 12)
    long = CaptionCollator(tok, preprocessor(32), max_length=12)
    rows = [{**captioned[0], "captions": [captioned[0]["captions"][2]]}]
    assert long(rows)["input_ids"].shape == (1, 12)  # truncated at max_length


def test_training_picks_random_captions_deterministically(tok, captioned):
    rows = [captioned[i] for i in range(12)]

    def picks(seed):
        collate = CaptionCollator(tok, preprocessor(32), max_length=8, train=True, seed=seed)
        return [tuple(collate(rows)["input_ids"][:, 1].tolist()) for _ in range(3)]

    assert picks(0) == picks(0)
    assert picks(0) != picks(1)
    firsts = CaptionCollator(tok, preprocessor(32), max_length=8)(rows)["input_ids"][:, 1]
    assert any(torch.any(torch.tensor(p) != firsts) for p in picks(0))  # not always the first caption


def test_templates_put_training_captions_in_prompt_form_and_group_them(tok, captioned):
    rows = [{**captioned[i], "captions": captioned[i]["captions"][:2]} for i in range(12)]
    templates = ["{}", "an emoji of {}."]
    collate = CaptionCollator(tok, preprocessor(32), max_length=32, train=True, templates=templates)
    texts, groups = set(), {}
    for _ in range(6):
        batch = collate(rows)
        for row, ids, group in zip(rows, batch["input_ids"], batch["caption_group"].tolist()):
            text = tok.decode(ids, skip_special_tokens=True)
            base = text.removeprefix("an emoji of ").removesuffix(".")
            assert base in row["captions"]
            texts.add(text.startswith("an emoji of"))
            groups.setdefault(group, set()).add(base)
    assert texts == {True, False}  # both templates drawn
    assert all(len(bases) == 1 for bases in groups.values())  # a group is one caption, in either template
    evaluation = CaptionCollator(tok, preprocessor(32), max_length=32, templates=templates)(rows[:2])
    assert "caption_group" not in evaluation  # evaluation reads the captions as written
    assert tok.decode(evaluation["input_ids"][1], skip_special_tokens=True) == "picture number 1"
    with pytest.raises(DataError, match="one '{}' each"):
        CaptionCollator(tok, preprocessor(32), train=True, templates=["an emoji"])


def test_training_augmentation_goes_through_with_augment(tok, captioned):
    collate = CaptionCollator(tok, preprocessor(32), train=True, augment=AugmentConfig(crop_scale=(0.5, 1.0), color_jitter=0.4))
    assert collate.preprocessor.augment.crop_scale == (0.5, 1.0)
    assert CaptionCollator(tok, preprocessor(32), augment=AugmentConfig(hflip=1.0)).preprocessor.augment.enabled is False  # eval: none
    assert collate([captioned[0]])["pixel_values"].shape == (1, 3, 32, 32)


def test_caption_collator_from_model():
    import mmtransfer

    model = mmtransfer.create_model("tiny-random")
    collate = CaptionCollator.from_model(model, train=True)
    assert collate.max_length == model.text_encoder.config.max_length
    assert collate.tokenizer is model.tokenizer


def test_collators_pickle_and_run_in_two_workers(tok, captioned):
    collate = CaptionCollator(tok, preprocessor(32), max_length=8, train=True, augment=AugmentConfig(crop_scale=(0.6, 1.0)))
    collate([captioned[0]])  # builds the transform and generator; pickling must still work
    clone = pickle.loads(pickle.dumps(collate))
    assert clone([captioned[1]])["pixel_values"].shape == (1, 3, 32, 32)
    loader = make_loader(captioned, collate, batch_size=4, shuffle=True, seed=3, num_workers=2)
    ids = torch.cat([b["image_index"] for b in loader])
    assert sorted(ids.tolist()) == list(range(100, 112))
    again = torch.cat([b["image_index"] for b in make_loader(captioned, collate, batch_size=4, shuffle=True, seed=3, num_workers=2)])
    assert torch.equal(ids, again)  # seeded: same order


def test_plain_dataloader_with_decoded_images(tok, captioned):
    loader = DataLoader(captioned, batch_size=5, collate_fn=LabelCollator(preprocessor(16)), num_workers=2)
    batches = list(loader)
    assert [b["labels"].shape[0] for b in batches] == [5, 5, 2]
    assert batches[0]["pixel_values"].shape == (5, 3, 16, 16)
    assert batches[0]["labels"].tolist() == [0, 1, 2, 0, 1]


def test_label_collator_needs_labels(captioned):
    rows = [{**captioned[0], "label": -1}]
    with pytest.raises(DataError, match="has no label.*require_labels=False"):
        LabelCollator(preprocessor(16))(rows)
    assert LabelCollator(preprocessor(16), require_labels=False)(rows)["labels"].tolist() == [-1]


def test_caption_collator_without_captions_is_a_clear_error(tok):
    with pytest.raises(DataError, match="no 'captions' column"):
        CaptionCollator(tok, preprocessor(16))([{"image": None, "label": 1}])


# ----------------------------------------------------------------------------- paired loading


def _ids_loader(n: int, batch: int, seed: int) -> DataLoader:
    ds = Dataset.from_dict({"image_id": list(range(n))})
    return make_loader(ds, lambda rows: torch.tensor([r["image_id"] for r in rows]), batch_size=batch, shuffle=True, seed=seed)


def test_paired_loader_cycles_the_shorter_one():
    pairs = PairedLoader(_ids_loader(10, 2, 0), _ids_loader(4, 2, 0), seed=7)  # 5 and 2 batches
    assert len(pairs) == 5
    batches = list(pairs)
    assert len(batches) == 5
    assert sorted(torch.cat([b["source"] for b in batches]).tolist()) == list(range(10))
    target = [b["target"] for b in batches]
    assert sorted(torch.cat(target[:2]).tolist()) == [0, 1, 2, 3]  # a full pass, then it starts again
    assert sorted(torch.cat(target[2:4]).tolist()) == [0, 1, 2, 3]
    assert pairs.epoch == 1


def test_paired_loader_epoch_length_options():
    source, target = _ids_loader(10, 2, 0), _ids_loader(4, 2, 0)
    assert len(PairedLoader(source, target, steps="min")) == 2
    assert len(PairedLoader(source, target, steps="target")) == 2
    assert len(list(PairedLoader(source, target, steps=7))) == 7
    with pytest.raises(DataError, match="steps must be"):
        PairedLoader(source, target, steps="longest")


def test_paired_loader_is_deterministic_given_a_seed():
    def run(seed, epochs=2):
        pairs = PairedLoader(_ids_loader(12, 3, 0), _ids_loader(6, 3, 0), seed=seed)
        return [[(b["source"].tolist(), b["target"].tolist()) for b in pairs] for _ in range(epochs)]

    first = run(1)
    assert first == run(1)
    assert first != run(2)
    assert first[0] != first[1]  # each epoch reshuffles
    pairs = PairedLoader(_ids_loader(12, 3, 0), _ids_loader(6, 3, 0), seed=1)
    pairs.set_epoch(1)  # resume straight into epoch 1
    assert [(b["source"].tolist(), b["target"].tolist()) for b in pairs] == first[1]


def test_paired_loader_with_accelerate_prepared_loaders():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)

    def prepared():
        return accelerator.prepare(_ids_loader(8, 2, 0), _ids_loader(4, 2, 0))

    def epoch(pairs):
        return [(b["source"].tolist(), b["target"].tolist()) for b in pairs]

    pairs = PairedLoader(*prepared(), seed=0)
    first, second = epoch(pairs), epoch(pairs)
    assert len(first) == 4 and sorted(sum((s for s, _ in first), [])) == list(range(8))
    assert first != second
    resumed = PairedLoader(*prepared(), seed=0)
    resumed.set_epoch(1)  # a fresh process resuming at epoch 1 sees the same batches
    assert epoch(resumed) == second


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_set_maps_every_caption_to_its_image(captioned):
    rs = retrieval_set(captioned)
    assert rs.num_images == 12 and len(rs.captions) == 36
    assert rs.caption_to_image.shape == (36,) and rs.caption_to_image[:4].tolist() == [0, 0, 0, 1]
    assert rs.image_to_captions[2] == [6, 7, 8]
    assert all(rs.caption_to_image[c] == i for i, caps in enumerate(rs.image_to_captions) for c in caps)
    batch = next(iter(rs.image_loader(preprocessor(16), batch_size=5)))
    assert batch["pixel_values"].shape == (5, 3, 16, 16) and batch["image_index"].tolist() == [100, 101, 102, 103, 104]
    assert sum(len(b) for b in rs.caption_batches(10)) == 36


def test_retrieval_set_needs_captions():
    with pytest.raises(DataError, match="needs a 'captions' column"):
        retrieval_set(Dataset.from_dict({"x": [1]}))


def test_undecoded_keeps_paths(captioned):
    raw = undecoded(captioned)
    assert raw[0]["image"]["path"].endswith("0.png")
    assert undecoded(raw) is raw
