"""``mgll demo`` through the top-level command: missing models give exit 2 and the way out, not a traceback."""

from mgll.cli import main


def test_demo_without_quickstart_artifacts_says_how_to_get_them(tmp_path, capsys):
    rc = main(["demo", "--quickstart", str(tmp_path / "no-quickstart-here")])
    err = capsys.readouterr()
    text = err.out + err.err
    assert rc == 2
    assert "mgll quickstart" in text
    assert "--base" in text and "--swapped" in text
