"""Aspect buckets, same-bucket batches, sampler determinism and multi-process sharding."""
import math

import pytest
import torch
from PIL import Image

from training.data import BucketBatchSampler, build_dataset, make_buckets, make_dataloader, set_epoch
from training.data.image import nearest_bucket, preprocess


def test_buckets_area_sides_and_assignment():
    buckets = make_buckets(1024)
    assert (1024, 1024) in buckets and (768, 1344) in buckets and (1344, 768) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024 ** 2
        assert h * w >= 0.85 * 1024 ** 2 and max(h / w, w / h) <= 4
    tiny = make_buckets(64)
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in tiny) and (64, 64) in tiny
    # nearest aspect in log space: a 3:2 landscape photo lands on the widest-ratio bucket near 1.5
    h, w = buckets[nearest_bucket((600, 900), buckets)]
    best = min(abs(math.log(bh / bw) - math.log(600 / 900)) for bh, bw in buckets)
    assert abs(math.log(h / w) - math.log(600 / 900)) == best and w > h
    assert buckets[nearest_bucket((500, 500), buckets)] == (1024, 1024)


def test_preprocess_crop_flip_conditioning():
    img = Image.new("RGB", (100, 50))
    img.paste((255, 255, 255), (0, 0, 10, 50))          # white stripe on the left edge
    s = preprocess(img, (32, 32))
    assert s["original_size"].tolist() == [50, 100] and s["target_size"].tolist() == [32, 32]
    assert s["crop_top_left"].tolist() == [0, 16]        # resized 64x32, centre crop
    full = preprocess(img, (32, 64))                      # whole image, stripe at left
    flipped = preprocess(img, (32, 64), flip=True)
    assert full["pixel_values"][0, :, 0].min() > 0.9 and flipped["pixel_values"][0, :, -1].min() > 0.9
    assert torch.equal(flipped["pixel_values"], full["pixel_values"].flip(-1))


def _mixed_folder(tmp_path):
    sizes = [(64, 64)] * 5 + [(128, 64)] * 4 + [(64, 128)] * 3  # (w, h)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (i * 20, 0, 0)).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text(f"c{i}")
    return build_dataset({"source": "folder", "path": str(tmp_path), "resolution": 64, "bucketing": True})


def test_same_bucket_batches(tmp_path):
    ds = _mixed_folder(tmp_path)
    assert ds.stats["num_buckets"] == 3
    loader = make_dataloader(ds, global_batch_size=2, seed=0)
    shapes = set()
    n = 0
    for batch in loader:
        assert len(set(batch["bucket"].tolist())) == 1
        shapes.add(tuple(batch["pixel_values"].shape[2:]))
        n += 1
    assert n == len(loader) == 2 + 2 + 1             # 5, 4, 3 images per bucket, drop_last
    assert shapes == {(64, 64), (40, 88), (88, 40)}  # 2:1 images -> nearest log-aspect bucket


def test_sampler_deterministic_by_seed_and_epoch():
    ids = [0] * 10 + [1] * 7 + [2] * 5
    s = BucketBatchSampler(ids, 4, seed=1)
    e0 = list(s)
    assert e0 == list(BucketBatchSampler(ids, 4, seed=1)) and len(e0) == len(s) == 2 + 1 + 1
    s.set_epoch(1)
    assert list(s) != e0
    s.set_epoch(0)
    assert list(s) == e0
    assert list(BucketBatchSampler(ids, 4, seed=2)) != e0
    for batch in e0:
        assert len({ids[i] for i in batch}) == 1 and len(batch) == 4
    used = [i for b in e0 for i in b]
    assert len(used) == len(set(used))


@pytest.mark.parametrize("nproc", [2, 4])
def test_per_process_shards_reassemble_global_order(nproc):
    ids = [i % 3 for i in range(50)]
    single = BucketBatchSampler(ids, 8, seed=5)
    single.set_epoch(3)
    shards = []
    for p in range(nproc):
        s = BucketBatchSampler(ids, 8, seed=5, num_processes=nproc, process_index=p)
        s.set_epoch(3)
        shards.append(list(s))
        assert all(len(b) == 8 // nproc for b in shards[-1])
    merged = [sum((shards[p][k] for p in range(nproc)), []) for k in range(len(shards[0]))]
    assert merged == list(single)
    with pytest.raises(ValueError, match="divisible"):
        BucketBatchSampler(ids, 6, num_processes=4)


def test_loader_random_augment_follows_epoch():
    ds = build_dataset({"num_images": 8, "resolution": 32, "image_size": 48,
                        "center_crop": False, "random_flip": True, "seed": 0})
    loader = make_dataloader(ds, global_batch_size=4, seed=0)

    def pixels_by_index(epoch):
        set_epoch(loader, epoch)
        return {i: px for b in loader for i, px in zip(b["index"].tolist(), b["pixel_values"])}
    a, b, c = pixels_by_index(0), pixels_by_index(0), pixels_by_index(1)
    assert all(torch.equal(a[i], b[i]) for i in a)
    # flip p=0.5 per (epoch, index): some of the 8 images flip between epochs
    assert sum(not torch.equal(a[i], c[i]) for i in a) > 0
    assert any(torch.equal(a[i], c[i].flip(-1)) and not torch.equal(a[i], c[i]) for i in a)


def test_two_process_loaders_reassemble_one_process_batches(tmp_path):
    ds = _mixed_folder(tmp_path)
    one = list(make_dataloader(ds, global_batch_size=2, seed=7))
    procs = [list(make_dataloader(ds, global_batch_size=2, seed=7, num_processes=2, process_index=p))
             for p in range(2)]
    assert len(procs[0]) == len(procs[1]) == len(one)
    for k, batch in enumerate(one):
        px = torch.cat([procs[0][k]["pixel_values"], procs[1][k]["pixel_values"]])
        assert torch.equal(px, batch["pixel_values"])
        assert procs[0][k]["caption"] + procs[1][k]["caption"] == batch["caption"]


def test_random_crop_stays_inside_and_varies():
    import random
    img = Image.new("RGB", (120, 40))
    offsets = set()
    for seed in range(20):
        s = preprocess(img, (32, 32), random_crop=True, rng=random.Random(seed))
        top, left = s["crop_top_left"].tolist()
        assert top == 0 and 0 <= left <= 96 - 32     # resized to 96x32
        offsets.add(left)
    assert len(offsets) > 5


def test_fewer_images_than_the_batch_names_the_real_key():
    from training.data import DataError

    with pytest.raises(DataError, match=r"'optim\.batch_size'.*larger than every bucket") as e:
        BucketBatchSampler([0, 0], 4)
    assert "data.batch_size" not in str(e.value)
