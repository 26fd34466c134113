"""Splits: seeded, content-disjoint, with a validation part carved from train."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qfm.data.splits import SplitProtocol, check_disjoint, make_splits, part_mask, split_columns
from qfm.errors import ConfigError, DataError


@settings(max_examples=60, deadline=None)
@given(
    group_sizes=st.lists(st.integers(min_value=1, max_value=6), min_size=2, max_size=60),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    test_fraction=st.floats(min_value=0.05, max_value=0.5),
    val_fraction=st.floats(min_value=0.0, max_value=0.3),
)
def test_every_split_is_content_disjoint_and_covers_all_rows(group_sizes, seed, test_fraction, val_fraction):
    content = [f"ref{g}" for g, size in enumerate(group_sizes) for _ in range(size)]
    protocol = SplitProtocol(n_splits=3, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
    splits = make_splits(content, protocol)
    frame = pd.concat([pd.Series(content, name="content_id"), splits], axis=1)
    n_groups = len(group_sizes)
    for column in split_columns(3):
        assert check_disjoint(frame, column) == []
        assert set(frame[column]) <= {"train", "val", "test"}
        test_groups = frame.loc[frame[column] == "test", "content_id"].nunique()
        assert test_groups == min(max(1, round(test_fraction * n_groups)), n_groups - 1)
        assert (frame[column] == "train").any()


def test_splits_are_seeded_and_differ_between_columns():
    content = [f"img{i}" for i in range(400)]
    a = make_splits(content, SplitProtocol(seed=7))
    b = make_splits(content, SplitProtocol(seed=7))
    c = make_splits(content, SplitProtocol(seed=8))
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)
    assert list(a.columns) == [f"split_{i}" for i in range(10)]
    assert a["split_0"].tolist() != a["split_1"].tolist()
    counts = a["split_0"].value_counts().to_dict()
    assert counts == {"train": 280, "val": 40, "test": 80}


def test_row_order_does_not_change_assignment():
    content = [f"ref{i % 25}" for i in range(100)]
    forward = make_splits(content).assign(content_id=content)
    backward = make_splits(content[::-1]).assign(content_id=content[::-1])
    left = forward.drop_duplicates("content_id").set_index("content_id").sort_index()
    right = backward.drop_duplicates("content_id").set_index("content_id").sort_index()
    pd.testing.assert_frame_equal(left, right)


def test_check_disjoint_names_leaking_content():
    frame = pd.DataFrame({"content_id": ["a", "a", "b"], "split_0": ["train", "test", "test"]})
    assert check_disjoint(frame, "split_0") == ["a"]


def test_bad_protocol_and_unknown_split_column_are_named():
    with pytest.raises(ConfigError, match="test_fraction"):
        SplitProtocol(test_fraction=1.5)
    with pytest.raises(DataError, match="at least 2"):
        make_splits(["only"])
    frame = pd.DataFrame({"split_0": ["train"]})
    with pytest.raises(ConfigError, match="split_7"):
        part_mask(frame, "split_7", "train")
    with pytest.raises(ConfigError, match="holdout"):
        part_mask(frame, "split_0", "holdout")
