from __future__ import annotations

import pytest

from fedtune.devices import (
    Tier,
    assign_tiers,
    drops_out,
    is_available,
    load_tiers,
    round_policy,
    simulated_seconds,
)
from fedtune.errors import ConfigError

SLOW = Tier(
    "slow",
    slowdown=4.0,
    memory_mb=1000,
    uplink_mbps=1.0,
    downlink_mbps=8.0,
    availability=0.5,
    dropout=0.25,
)


def test_simulated_seconds_is_download_compute_upload():
    # 1 MB down at 8 Mbit/s = 1 s; 2 s of host compute x 4 = 8 s; 0.5 MB up at 1 Mbit/s = 4 s
    assert simulated_seconds(SLOW, 1_000_000, 500_000, 2.0) == pytest.approx(13.0)


def test_round_policy_keeps_first_within_deadline():
    reports = [(0, 5.0), (1, 12.0), (2, 3.0), (3, 7.0), (4, 9.0), (5, 3.0)]
    kept, discarded = round_policy(reports, deadline_s=10.0, keep=3)
    assert kept == [2, 5, 0]  # by arrival, ties by client
    assert discarded[1].startswith("straggler: 12.0 s > deadline 10.0 s")
    assert discarded[3].startswith("surplus") and discarded[4].startswith("surplus")
    assert set(kept) | set(discarded) == {c for c, _ in reports}


def test_round_policy_below_quorum_keeps_all_in_time():
    kept, discarded = round_policy([(0, 1.0), (1, 20.0)], deadline_s=10.0, keep=3)
    assert kept == [0] and list(discarded) == [1]


def test_tier_mix_is_fixed_and_follows_weights():
    a = assign_tiers(2000, ["x", "y"], [0.25, 0.75])
    assert a == assign_tiers(2000, ["x", "y"], [0.25, 0.75])
    assert 0.2 < a.count("x") / 2000 < 0.3


def test_availability_and_dropout_are_seeded_draws():
    draws = [is_available(SLOW, 0, r, c) for r in range(20) for c in range(50)]
    assert draws == [is_available(SLOW, 0, r, c) for r in range(20) for c in range(50)]
    assert 0.4 < sum(draws) / len(draws) < 0.6
    drops = [drops_out(SLOW, 0, r, c) for r in range(20) for c in range(50)]
    assert 0.18 < sum(drops) / len(drops) < 0.32
    assert draws != [is_available(SLOW, 1, r, c) for r in range(20) for c in range(50)]


def test_shipped_tiers_load():
    tiers = load_tiers("devices")
    assert len(tiers) >= 5
    assert all(t.source for t in tiers.values())


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "[tiers.a]\nslowdown = 0\nmemory_mb = 1\nuplink_mbps = 1\ndownlink_mbps = 1\n"
            "availability = 1\ndropout = 0\n",
            "tiers.a.slowdown' must be positive",
        ),
        (
            "[tiers.a]\nslowdown = 1\nmemory_mb = 1\nuplink_mbps = 1\ndownlink_mbps = 1\n"
            "availability = 2\ndropout = 0\n",
            "tiers.a.availability' must be in [0, 1]",
        ),
        ("[tiers.a]\nspeed = 1\n", "unknown key 'tiers.a.speed'"),
        ("[other]\n", "no [tiers.<name>] tables"),
    ],
)
def test_bad_tier_files(tmp_path, body, message):
    path = tmp_path / "t.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_tiers(str(path))
