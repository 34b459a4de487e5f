"""`mgll quickstart` end to end at a reduced size: data, two encoders, both loadable."""

import json

import open_clip

from mgll.cli import main


def test_quickstart_writes_data_and_both_encoders(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--out", str(out), "--n", "120", "--steps", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "encoder-mgll" / "encoder") in printed and str(out / "encoder-clip" / "encoder") in printed
    assert (out / "data" / "synthetic-fundus" / "records.jsonl").is_file()
    for loss in ("mgll", "clip"):
        enc = out / f"encoder-{loss}" / "encoder"
        assert json.loads((enc / "mgll_config.json").read_text())["loss"] == loss
        open_clip.create_model_and_transforms(f"local-dir:{enc}")
    # rerunning into the same folder replaces the runs instead of failing or mixing them
    assert main(["quickstart", "--out", str(out), "--n", "120", "--steps", "3", "--no-progress"]) == 0
    rows = (out / "encoder-mgll" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]


def test_synth_cli(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "x"), "--kind", "xray", "--n", "24", "--size", "48"]) == 0
    assert "wrote 24 xray records" in capsys.readouterr().out
