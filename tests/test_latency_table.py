"""Latency table: interleaved medians, inert actions, atomic calibration, JSON round trip."""
import itertools

import pytest

from latency_table import LatencyEntry, LatencyTable


def test_calibration_interleaves_and_takes_medians():
    calls = []
    times = {"none": (0.10, 0.020), "ffn_neurons:0.5": (0.05, 0.010)}

    def time_one(action, bucket):
        calls.append(action)
        return times[action]

    table = LatencyTable()
    table.calibrate("idle", ["short"], ["none", "ffn_neurons:0.5"], time_one, repeats=2)
    # warm-up, then (dense, pruned) pairs: A B A B
    assert calls == ["none"] + ["none", "none"] * 2 + ["none", "ffn_neurons:0.5"] * 2
    entry = table.get("idle", "short", "ffn_neurons:0.5")
    assert entry.speedup(10) == pytest.approx((0.10 + 10 * 0.020) / (0.05 + 10 * 0.010))
    assert entry.latency(10) == pytest.approx(0.15)


def test_inert_actions_copy_the_dense_entry_without_timing():
    calls = []
    table = LatencyTable()
    table.calibrate("idle", ["short"], ["none", "kv_cache:0.5"],
                    lambda a, b: calls.append(a) or (0.1, 0.01), repeats=1,
                    inert=lambda bucket, action: action.startswith("kv_cache"))
    assert "kv_cache:0.5" not in calls
    entry = table.get("idle", "short", "kv_cache:0.5")
    none = table.get("idle", "short", "none")
    assert entry.samples == 0 and entry.latency(8) == none.latency(8) and entry.speedup(8) == none.speedup(8)


def test_interrupted_calibration_leaves_no_entries():
    counter = itertools.count()

    def flaky(action, bucket):
        if next(counter) == 4:
            raise KeyboardInterrupt
        return (0.1, 0.01)

    table = LatencyTable()
    with pytest.raises(KeyboardInterrupt):
        table.calibrate("loaded", ["short", "long"], ["none", "ffn_neurons:0.5"], flaky)
    assert not table.has("loaded")


def test_round_trip_and_missing_entry_message():
    table = LatencyTable({"idle|short|none": LatencyEntry(0.1, 0.01, 0.1, 0.01, 2)})
    assert LatencyTable.from_dict(table.to_dict()).entries == table.entries
    with pytest.raises(KeyError, match="scenario 'loaded'"):
        table.get("loaded", "short", "none")
