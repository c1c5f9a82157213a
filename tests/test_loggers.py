"""The metric writers for real: TensorBoard (tensorboardX event files) and Weights & Biases
(offline run files), read back after logging. A non-finite value is never written."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from dapo_jax.train.metrics_log import MetricsLog, device_memory
from tests.launching import wait_for

STEPS = [{"reward/accuracy": 0.25, "policy/grad_norm": 1.5},
         {"reward/accuracy": 0.5, "policy/grad_norm": float("nan")},
         {"reward/accuracy": 0.75, "policy/grad_norm": 0.5}]


def log_steps(run_dir: Path, loggers: tuple[str, ...]) -> None:
    log = MetricsLog(run_dir, loggers, project="dapo_jax_test", run_name="loggers",
                     config={"trainer": {"seed": 1}})
    for step, metrics in enumerate(STEPS, 1):
        log.log(step, metrics, echo=lambda _: None)
    log.close()


def tfrecords(path: Path) -> list[bytes]:
    """Records of a TFRecord file: u64 length, u32 crc, data, u32 crc."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        out.append(data[pos + 12:pos + 12 + length])
        pos += 16 + length
    return out


def test_tensorboard_event_file(tmp_path):
    from tensorboardX.proto import event_pb2

    log_steps(tmp_path, ("tensorboard",))
    (events,) = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    scalars: dict[str, dict[int, float]] = {}
    for record in tfrecords(events):
        event = event_pb2.Event.FromString(record)
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    assert scalars["reward/accuracy"] == {1: 0.25, 2: 0.5, 3: 0.75}
    assert scalars["policy/grad_norm"] == {1: 1.5, 3: 0.5}  # the NaN is not written


def wandb_records(path: Path) -> list[bytes]:
    """Records of a W&B run file: a 7-byte ':W&B' header, then LevelDB log framing (32 KiB
    blocks; each fragment: u32 crc, u16 length, u8 type 1 full / 2 first / 3 middle /
    4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    out, pos, partial = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a fragment is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind in (2, 3):
            partial = (partial if kind == 3 else b"") + chunk
        elif kind == 4:
            out.append(partial + chunk)
    return out


def test_wandb_offline_run(tmp_path, monkeypatch):
    from wandb.proto import wandb_internal_pb2

    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written locally
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_steps(tmp_path, ("wandb",))

    def read() -> tuple[list[dict], dict]:
        history, config = [], {}
        for run_file in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb"):
            for data in wandb_records(run_file):
                record = wandb_internal_pb2.Record.FromString(data)
                kind = record.WhichOneof("record_type")
                if kind == "history":
                    history.append({item.key or "/".join(item.nested_key):
                                    json.loads(item.value_json) for item in record.history.item})
                elif kind == "run":  # the run's start record carries the config
                    config.update({item.key: json.loads(item.value_json)
                                   for item in record.run.config.update})
        return history, config

    # wandb's service process writes the file: wait until the three history records are in
    # it (an event) rather than reading it at once (read back empty on a loaded machine).
    wait_for(lambda: len(read()[0]) >= 3, 120, what="three W&B history records")
    history, config = read()
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["reward/accuracy"] for h in history] == [0.25, 0.5, 0.75]
    assert "policy/grad_norm" not in history[1]  # the NaN is not written
    assert history[2]["policy/grad_norm"] == 0.5
    assert config["trainer"] == {"seed": 1}


def test_jsonl_writes_null_for_non_finite(tmp_path):
    log_steps(tmp_path, ("jsonl",))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["policy/grad_norm"] is None and not any(
        isinstance(v, float) and not math.isfinite(v) for r in rows for v in r.values())


def test_device_memory_metrics():
    """GPU/TPU devices report their allocator's peak and limit (the most and the least over
    the process's devices); CPU devices report nothing, so no key is logged."""
    import jax

    class Device:
        def __init__(self, peak: float, limit: float):
            self.stats = {"peak_bytes_in_use": peak * 2**30, "bytes_limit": limit * 2**30}

        def memory_stats(self):
            return self.stats

    assert device_memory([Device(3.0, 70.0), Device(5.0, 68.0)]) == {
        "memory/peak_gib": 5.0, "memory/limit_gib": 68.0}
    assert device_memory(jax.local_devices()) == {}
