import json

import pytest

from rainfusion.cli import main


def test_bench_prints_a_table_and_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", "--heads", "3", "--repeats", "1", "--no-progress",
                 "--methods", "dense", "rainfusion", "rainfusion2", "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "rainfusion2" in printed and "speed-up" in printed
    report = json.loads(out_json.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"dense", "rainfusion", "rainfusion2"}
    assert rows["dense"]["rel_l2"] < 1e-5 and rows["dense"]["density"] == 1.0
    assert 0 < rows["rainfusion2"]["density"] < 1 and 0 < rows["rainfusion2"]["recall"] < 1
    assert sum(rows["rainfusion"]["patterns"].values()) == 3
    assert report["device"] and report["date"]
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_bench_bad_values_exit_non_zero_with_a_message(capsys):
    assert main(["bench", "--heads", "0", "--no-progress"]) == 2
    assert "heads" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--dtype", "float64"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
