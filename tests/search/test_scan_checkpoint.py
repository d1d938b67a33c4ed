"""Resumable pair scans (pipeline.search.checkpoint): a scan stopped after a saved block and rerun continues
there and gives exactly the uninterrupted result (thresholds, top pairs), on the pilot path (one scan) and
on the exact two-scan path; a checkpoint of other settings is ignored; build-pools resumes and cleans up."""
import json

import numpy as np
import pytest

from pipeline.search.checkpoint import ScanCheckpoint
from pipeline.search.statistics import negative_statistics


class Killed(Exception):
    pass


class KilledAfter(ScanCheckpoint):
    """Saves after every block and stops the scan (like a SIGKILL) once `blocks` blocks were saved."""

    def __init__(self, path, identity, blocks):
        super().__init__(path, identity, every_s=0)
        self.blocks = blocks

    def after_block(self, blocks_done, consumers):
        super().after_block(blocks_done, consumers)
        if blocks_done >= self.blocks:
            raise Killed


def data(n=600, dim=16, classes=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, classes, n))
    x = rng.normal(size=(classes, dim))[labels] + rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def stats(x, labels, pilot_rows, checkpoint=None):
    return negative_statistics(x, labels, 500, block_rows=64, pilot_rows=pilot_rows, backend="numpy",
                               checkpoint=checkpoint)


@pytest.mark.parametrize("pilot_rows", [32, 0])  # pilot windows (one scan) / coarse + exact ranks (two scans)
def test_a_stopped_scan_resumes_exactly(tmp_path, pilot_rows):
    x, labels = data()
    reference, ref_pairs, ref_sims = stats(x, labels, pilot_rows)
    path = tmp_path / "scan.npz"
    with pytest.raises(Killed):
        stats(x, labels, pilot_rows, KilledAfter(path, {"run": 1}, blocks=17))
    assert path.exists()
    again = ScanCheckpoint(path, {"run": 1}, every_s=0)
    result, pairs, sims = stats(x, labels, pilot_rows, again)
    assert list(again.resumed_at.values()) == [17]
    assert result["thresholds"] == reference["thresholds"]
    np.testing.assert_array_equal(pairs, ref_pairs)
    np.testing.assert_array_equal(sims, ref_sims)


def test_other_settings_start_over(tmp_path):
    x, labels = data()
    path = tmp_path / "scan.npz"
    with pytest.raises(Killed):
        stats(x, labels, 32, KilledAfter(path, {"run": 1}, blocks=5))
    other = ScanCheckpoint(path, {"run": 2}, every_s=1e9)
    reference = stats(x, labels, 32)[0]
    assert stats(x, labels, 32, other)[0]["thresholds"] == reference["thresholds"]
    assert other.resumed_at == {}


def test_build_pools_resumes_and_removes_its_state(tmp_path, monkeypatch):
    """The stage: a build stopped inside its scan leaves pools.scan.npz; the rerun says where it resumed, writes
    the thresholds of an uninterrupted build and removes the state file."""
    import typer
    from test_pools import views_data, write_cache
    from typer.testing import CliRunner

    import stages.build_pools as stage

    views, labels = views_data(n=400, classes=40)
    write_cache(tmp_path / "cache.h5", views, labels)
    app = typer.Typer()
    app.command()(stage.COMMANDS["build-pools"])

    def build(out):
        return CliRunner().invoke(app, ["--cache", str(tmp_path / "cache.h5"), "--out", str(out), "--hard-pairs", "50",
                                        "--block-rows", "32"])

    assert build(tmp_path / "reference").exit_code == 0
    with monkeypatch.context() as patch:
        patch.setattr(stage, "ScanCheckpoint", lambda path, identity: KilledAfter(path, identity, blocks=9))
        assert isinstance(build(tmp_path / "pools").exception, Killed)
    assert (tmp_path / "pools" / stage.SCAN_STATE).exists()
    run = build(tmp_path / "pools")
    assert run.exit_code == 0, run.output
    assert "scan at block 9 from" in run.output
    assert not (tmp_path / "pools" / stage.SCAN_STATE).exists()
    assert json.loads((tmp_path / "pools" / "thresholds.json").read_text()) == json.loads(
        (tmp_path / "reference" / "thresholds.json").read_text())


def _forged_block(path):
    """The same arrays with another position (what the issue's forged file did)."""
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    arrays["block"] = np.array(int(arrays["block"]) + 3, np.int64)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


DAMAGE = {
    "half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "100 bytes": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "empty": lambda p: p.write_bytes(b""),
    "flipped byte": lambda p: p.write_bytes(_flipped(p.read_bytes(), p.stat().st_size // 2)),
    "forged block": _forged_block,
}


def _flipped(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x40]) + raw[at + 1:]


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_discarded_with_a_note_and_the_scan_gives_the_uninterrupted_result(
        tmp_path, capsys, damage):
    x, labels = data()
    reference, ref_pairs, ref_sims = stats(x, labels, 32)
    path = tmp_path / "scan.npz"
    with pytest.raises(Killed):
        stats(x, labels, 32, KilledAfter(path, {"run": 1}, blocks=17))
    DAMAGE[damage](path)
    capsys.readouterr()
    again = ScanCheckpoint(path, {"run": 1}, every_s=1e9)
    result, pairs, sims = stats(x, labels, 32, again)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and f"{path}: damaged scan checkpoint" in notes[0] and "starts over" in notes[0]
    assert again.resumed_at == {} and not path.exists()
    assert result["thresholds"] == reference["thresholds"]
    np.testing.assert_array_equal(pairs, ref_pairs)
    np.testing.assert_array_equal(sims, ref_sims)
