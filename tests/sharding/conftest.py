"""Fixtures for the sharding tests: image trees built from the real photos bundled with scikit-image
and scikit-learn, written as JPEG/PNG files under tmp paths, and small shard sets made from them."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.sharding.shardtest_helpers import build_photo_folder


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    build_photo_folder(root)
    return root


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """Demo crops (32 px): train 240 samples in 10 shards of 24, val 60 in 3 shards, unseen 20 in 1."""
    from sharding.images import ImageOptions
    from sharding.plan import plan_shards
    from sharding.sources import DemoSource
    from sharding.storage import Destination
    from sharding.write import shard_source

    dest = tmp_path_factory.mktemp("demo_shards")
    plan = plan_shards(DemoSource(seed=3, train=240, val=60, unseen=20, size=32), shard_maxcount=24, seed=3,
                       image_options=ImageOptions())
    shard_source(plan, Destination(str(dest)), workers=1)
    return dest
