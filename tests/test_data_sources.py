"""Data sources and bad input: folder + captions, JSONL, generated shapes, corrupt files."""
import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import DatasetOptions, DataError, build_dataset, collate


def _png(path, size=(40, 30), colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _folder(tmp_path, n=3):
    for i in range(n):
        _png(tmp_path / f"img{i}.png", colour=(i * 80, 0, 0))
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}\n")
    return tmp_path


def test_folder_with_captions(tmp_path):
    _folder(tmp_path)
    _png(tmp_path / "sub" / "deep.png")
    (tmp_path / "sub" / "deep.txt").write_text("deep one")
    ds = build_dataset({"source": "folder", "path": str(tmp_path), "resolution": 16})
    assert len(ds) == 3 and [ds[i]["caption"] for i in range(3)] == ["caption 0", "caption 1", "caption 2"]
    s = ds[1]
    assert s["pixel_values"].shape == (3, 16, 16) and s["pixel_values"].dtype == torch.float32
    # red 80 -> 80/127.5 - 1; green 0 -> -1
    assert torch.allclose(s["pixel_values"][0], torch.full((16, 16), 80 / 127.5 - 1), atol=1e-6)
    assert s["pixel_values"][1].eq(-1).all()
    assert s["original_size"].tolist() == [30, 40]
    # 40x30 scaled to cover 16x16 -> 21x16 (w x h), centre crop left = (21 - 16) // 2
    assert s["crop_top_left"].tolist() == [0, 2]
    rec = build_dataset({"source": "folder", "path": str(tmp_path), "recursive": True, "resolution": 16})
    assert len(rec) == 4 and "deep one" in [rec[i]["caption"] for i in range(4)]


def test_missing_captions_error_lists_files_or_empty(tmp_path):
    _folder(tmp_path)
    _png(tmp_path / "lonely.png")
    with pytest.raises(DataError, match=r"lonely\.png") as e:
        build_dataset({"source": "folder", "path": str(tmp_path)})
    assert "data.missing_caption" in str(e.value)
    ds = build_dataset({"source": "folder", "path": str(tmp_path), "missing_caption": "empty"})
    assert ds.stats["num_missing_captions"] == 1
    assert "" in [ds[i]["caption"] for i in range(len(ds))]


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"data\.path.*does not exist"):
        build_dataset({"source": "folder", "path": str(tmp_path / "nope")})
    with pytest.raises(DataError, match=r"data\.path is not set"):
        build_dataset({"source": "folder"})
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"data\.path.*contains no images"):
        build_dataset({"source": "folder", "path": str(tmp_path)})
    with pytest.raises(DataError, match=r"data\.resolutoin"):
        DatasetOptions.from_dict({"resolutoin": 64})


def test_corrupt_and_truncated_images_reported_by_name_and_counted(tmp_path):
    _folder(tmp_path)
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    (tmp_path / "garbage.txt").write_text("x")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "truncated.txt").write_text("y")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = build_dataset({"source": "folder", "path": str(tmp_path), "resolution": 16})
    msg = " ".join(str(x.message) for x in w)
    assert "garbage.png" in msg and "truncated.png" in msg and "2 of 5" in msg
    assert ds.stats["num_unreadable"] == 2 and ds.stats["num_ok"] == 3 and len(ds) == 3
    assert sorted(p.split("/")[-1] for p in ds.stats["unreadable_files"]) == ["garbage.png", "truncated.png"]


def test_jsonl_manifest_relative_absolute_and_bad_lines(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    other = tmp_path / "elsewhere"
    _png(other / "b.png", size=(20, 20))
    man = tmp_path / "imgs" / "train.jsonl"
    man.write_text(json.dumps({"image": "a.png", "caption": "first"}) + "\n\n"
                   + json.dumps({"image": str(other / "b.png"), "caption": "second"}) + "\n")
    ds = build_dataset({"source": "jsonl", "path": str(man), "resolution": 8})
    assert [ds[i]["caption"] for i in range(2)] == ["first", "second"]
    assert ds[1]["original_size"].tolist() == [20, 20]
    man.write_text(json.dumps({"image": "a.png", "caption": "ok"}) + "\n"
                   + "{not json\n"
                   + json.dumps({"image": "../elsewhere/b.png", "caption": "escape"}) + "\n"
                   + json.dumps({"image": "a.png"}) + "\n")
    with pytest.raises(DataError) as e:
        build_dataset({"source": "jsonl", "path": str(man)})
    text = str(e.value)
    assert "3 bad line(s)" in text and "line 2:" in text and "line 3:" in text and "escapes" in text
    assert "line 4:" in text and "caption" in text and "line 1:" not in text


def test_generated_dataset_is_deterministic_and_captions_match_pixels():
    a = build_dataset({"num_images": 6, "resolution": 32, "seed": 3})
    b = build_dataset({"num_images": 6, "resolution": 32, "seed": 3})
    c = build_dataset({"num_images": 6, "resolution": 32, "seed": 4})
    assert all(torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) for i in range(6))
    assert [a[i]["caption"] for i in range(6)] == [b[i]["caption"] for i in range(6)]
    assert [a[i]["caption"] for i in range(6)] != [c[i]["caption"] for i in range(6)]
    from training.data.sources import BACKGROUND, COLOURS, SHAPES, parse_generated_caption
    for i in range(6):
        s = a[i]
        attrs = parse_generated_caption(s["caption"])
        assert s["caption"] == f"a {attrs['colour']} {attrs['shape']}" and attrs["shape"] in SHAPES
        rgb = ((s["pixel_values"] + 1) * 127.5).round()
        assert rgb[:, 0, 0].tolist() == list(BACKGROUND)                  # grey background
        assert rgb[:, 16, 16].tolist() == list(COLOURS[attrs["colour"]])  # the shape's colour near the centre
        fg = (rgb != torch.tensor(BACKGROUND).view(3, 1, 1)).any(0)
        ys, xs = fg.nonzero(as_tuple=True)
        fill = fg.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))   # square 1, circle ~pi/4
        assert (fill > 0.95) == (attrs["shape"] == "square"), (s["caption"], float(fill))
    eight = build_dataset({"num_images": 16, "resolution": 32, "seed": 0})
    caps = [eight[i]["caption"] for i in range(16)]
    assert len(set(caps[:8])) == 8 and len(set(caps[8:])) == 8     # every colour x shape pair once per 8
    assert parse_generated_caption("") is None and parse_generated_caption("a purple circle") is None
    batch = collate([a[0], a[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["caption"] == [a[0]["caption"], a[1]["caption"]]
    assert batch["original_size"].shape == (2, 2) and batch["index"].tolist() == [0, 1]


def test_trainer_config_shape_is_accepted(tmp_path):
    """training/config.py's data section: source may be a path, num_generated, extra, trainer keys."""
    import dataclasses
    import pickle

    @dataclasses.dataclass
    class TrainerData:
        source: str = "generated"
        resolution: int = 16
        num_generated: int = 5
        caption_dropout: float = 0.1
        num_workers: int = 0
        cache_dir: str = ""
        extra: dict = dataclasses.field(default_factory=lambda: {"random_flip": True})

    ds = build_dataset(TrainerData())
    assert len(ds) == 5 and ds.random_flip
    pickle.loads(pickle.dumps(ds))[0]                   # DataLoader workers can receive it
    _folder(tmp_path)
    assert len(build_dataset(TrainerData(source=str(tmp_path)))) == 3
    with pytest.raises(DataError, match=r"data\.source = .*does not exist"):
        build_dataset(TrainerData(source=str(tmp_path / "missing")))
    with pytest.raises(DataError, match=r"data\.source = .*not a file"):
        build_dataset(TrainerData(source=str(tmp_path / "missing.jsonl")))


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6                                      # rotate 90 on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    (tmp_path / "rot.txt").write_text("rotated")
    ds = build_dataset({"source": "folder", "path": str(tmp_path), "resolution": 16})
    assert ds[0]["original_size"].tolist() == [40, 20]


def test_non_utf8_caption_or_manifest_names_the_file(tmp_path):
    """Latin-1 text is one DataError naming the file, not a UnicodeDecodeError traceback."""
    _folder(tmp_path / "imgs", n=2)
    (tmp_path / "imgs" / "img1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"caption file .*img1\.txt: not UTF-8"):
        build_dataset({"source": "folder", "path": str(tmp_path / "imgs"), "resolution": 16})
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes('{"image": "imgs/img0.png", "caption": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"manifest data\.path file .*m\.jsonl: not UTF-8"):
        build_dataset({"source": "jsonl", "path": str(manifest), "resolution": 16})
