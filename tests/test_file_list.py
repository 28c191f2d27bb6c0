"""FileList: the streamed split's paths in one buffer (no per-worker copy-on-read of a list of str)."""
import os
import pickle

import pytest
import torch

from compressor.data.stream import FileList, FileSplit, eval_files, subset_files

PATHS = ["/data/train/cat/1.jpg", "/données/chien/é.png", "x", os.fsdecode(b"/odd/\xff.jpg"), ""]


def test_paths_come_back_as_they_went_in():
    files = FileList(PATHS)
    assert len(files) == 5 and list(files) == PATHS and files == PATHS
    assert files[3] == PATHS[3] and os.fsencode(files[3]) == b"/odd/\xff.jpg"  # not UTF-8: round-trips
    assert files[-1] == "" and files[-5] == PATHS[0]
    with pytest.raises(IndexError, match="file index 5 out of range for 5 files"):
        files[5]
    with pytest.raises(IndexError):
        files[-6]
    assert list(files[1:4]) == PATHS[1:4] and list(files[::-2]) == PATHS[::-2]


def test_take_copies_the_chosen_paths_in_order_with_repeats():
    files = FileList(PATHS)
    assert list(files.take(torch.tensor([3, 0, 0, 4, 1]))) == [PATHS[i] for i in (3, 0, 0, 4, 1)]
    assert list(files.take([-1, 2])) == [PATHS[-1], PATHS[2]]
    assert list(files.take([])) == [] and list(FileList().take([])) == []
    with pytest.raises(IndexError):
        files.take([0, 5])


def test_take_across_chunks(monkeypatch):
    import compressor.data.stream as stream

    monkeypatch.setattr(stream, "TAKE_CHUNK", 2)  # 5 paths: chunks of 2, 2 and 1
    order = [4, 3, 0, 1, 3]
    assert list(FileList(PATHS).take(order)) == [PATHS[i] for i in order]


def test_pickles_and_splits_share_or_subset_it():
    files = FileList([f"/data/train/{i}.jpg" for i in range(3000)])
    back = pickle.loads(pickle.dumps(files))  # spawned workers get it this way
    assert back == files and back[2999] == "/data/train/2999.jpg"
    split = FileSplit(PATHS, torch.arange(5), (8, 8), 3, eval_crop=0.875)
    assert isinstance(split.files, FileList) and split.files == PATHS
    assert eval_files(split).files._blob is split.files._blob  # the evaluation view shares the buffer
    sub = subset_files(split, torch.tensor([4, 1]))
    assert list(sub.files) == [PATHS[4], PATHS[1]] and sub.labels.tolist() == [4, 1]
