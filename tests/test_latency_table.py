"""Latency table: interleaved medians, inert actions, atomic calibration, JSON round trip."""
import itertools

import pytest

from environments.latency_table import LatencyEntry, LatencyTable


def test_calibration_interleaves_and_takes_medians():
    calls = []
    times = {"none": (0.10, 0.020), "ffn_neurons:0.5": (0.05, 0.010)}

    def time_one(action, bucket):
        calls.append(action)
        return times[action]

    table = LatencyTable()
    table.calibrate("idle", ["short"], ["none", "ffn_neurons:0.5"], time_one, repeats=2, runtime="stock/2t/eager")
    # (dense, pruned) pairs, A B A B; each side's first run is an untimed warm-up (runtime.timing)
    ffn = "ffn_neurons:0.5"
    assert calls == ["none"] + ["none", "none"] * 2 + ["none", ffn, ffn] + ["none", ffn]
    entry = table.get("idle", "short", "ffn_neurons:0.5")
    assert entry.runtime == "stock/2t/eager"
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


def test_tables_written_before_the_runtime_field_still_load():
    old = {"idle|short|none": {"prefill_s": 0.1, "decode_per_token_s": 0.01, "dense_prefill_s": 0.1,
                               "dense_decode_per_token_s": 0.01, "samples": 2, "scaled_from": None}}
    assert LatencyTable.from_dict(old).get("idle", "short", "none").runtime is None


def test_round_trip_and_missing_entry_message():
    table = LatencyTable({"idle|short|none": LatencyEntry(0.1, 0.01, 0.1, 0.01, 2)})
    assert LatencyTable.from_dict(table.to_dict()).entries == table.entries
    with pytest.raises(KeyError, match="scenario 'loaded'"):
        table.get("loaded", "short", "none")


def test_table_loads_from_a_table_file_or_a_run_metrics_file(tmp_path):
    import json

    from modes.outputs import load_table

    table = LatencyTable({LatencyTable.key("loaded", "short", "none"): LatencyEntry(0.2, 0.03, 0.2, 0.03, 3)})
    (tmp_path / "latency_table.json").write_text(json.dumps(table.to_dict()))
    (tmp_path / "metrics.json").write_text(json.dumps({"mode": "test", "latency_table": table.to_dict()}))
    for name in ("latency_table.json", "metrics.json"):
        assert load_table(str(tmp_path / name)).to_dict() == table.to_dict()
    with pytest.raises(FileNotFoundError, match="--latency-table"):
        load_table(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"x": {"prefill_s": 1}}))
    with pytest.raises(ValueError, match="--latency-table"):
        load_table(str(tmp_path / "bad.json"))


def test_scaled_scenario_keeps_idle_speedups_and_scales_latency_by_the_dense_slowdown():
    table = LatencyTable()
    times = {"none": (0.10, 0.020), "ffn_neurons:0.5": (0.05, 0.010)}
    table.calibrate("idle", ["short"], list(times), lambda a, b: times[a], repeats=1)
    slow = iter([(9.0, 9.0)] + [(0.2, 0.03), (0.2, 0.05), (0.2, 0.04)])   # warm-up, then 3 dense runs
    table.calibrate_scaled("idle", "loaded", ["short"], lambda bucket: next(slow), repeats=3)
    idle, loaded = table.get("idle", "short", "ffn_neurons:0.5"), table.get("loaded", "short", "ffn_neurons:0.5")
    assert loaded.speedup(8) == pytest.approx(idle.speedup(8))
    assert loaded.latency(0) == pytest.approx(idle.latency(0) * 2.0)                 # prefill 0.2 / 0.1
    assert loaded.decode_per_token_s == pytest.approx(idle.decode_per_token_s * 2.0)  # median 0.04 / 0.02
    assert loaded.scaled_from == "idle x 2.00/2.00" and loaded.samples == 3
    assert table.get("loaded", "short", "none").dense_latency(8) == pytest.approx(0.2 + 8 * 0.04)
    assert LatencyTable.from_dict(table.to_dict()).to_dict() == table.to_dict()
    with pytest.raises(KeyError, match="calibrate it first"):
        table.calibrate_scaled("light", "loaded", ["short"], lambda bucket: (1.0, 1.0))
