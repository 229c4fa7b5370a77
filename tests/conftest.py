"""Session fixtures: the tiny checkpoints most tests convert. Helpers are in helpers.py."""

from pathlib import Path

import pytest
from helpers import ODD, WIDE

from mixtral_convert.synth import tiny_config, write_torrent


@pytest.fixture(scope="session")
def wide_src(tmp_path_factory) -> Path:
    return write_torrent(tmp_path_factory.mktemp("wide") / "src", tiny_config(**WIDE), seed=1)


@pytest.fixture(scope="session")
def odd_src(tmp_path_factory) -> Path:
    return write_torrent(tmp_path_factory.mktemp("odd") / "src", tiny_config(**ODD), seed=2)
