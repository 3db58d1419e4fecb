"""``dualtoken export onnx``: writes, checks against PyTorch, and fails in one line."""

from __future__ import annotations

from dualtoken.cli.main import main


def test_export_onnx_writes_and_checks(tmp_path, capsys):
    out = tmp_path / "tiny-onnx"
    assert main(["export", "onnx", "dualtoken-tiny", str(out), "--random-weights"]) == 0
    assert {p.name for p in out.iterdir()} == {"encoder.onnx", "decoder.onnx", "manifest.json"}
    printed = capsys.readouterr().out
    assert "checked in ONNX Runtime on 3 demo photos" in printed and "decoded images within" in printed


def test_export_errors_are_one_line(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["export", "onnx", "dualtoken-tiny", str(target), "--random-weights"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file; expected a folder" in err[0]
    assert main(["export", "onnx", "no-such-model", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
