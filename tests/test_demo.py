"""`offseg demo`, the README's main job, end to end on its generated dataset (2 iterations)."""

from __future__ import annotations

from offseg.cli.main import main


def test_demo_trains_evaluates_and_writes_overlays(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--iters", "2", "--images", "2", "--no-card"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "generating the street-scene dataset" in printed and "mIoU" in printed
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == 4 and sum(name.endswith("_overlay.png") for name in overlays) == 2
    assert (out / "sheet.png").stat().st_size > 0 and (out / "train" / "best.pth").is_file()
    # Re-running continues where it stopped: nothing to train, the same outputs again.
    assert main(args) == 0
    assert "training already finished" in capsys.readouterr().out
