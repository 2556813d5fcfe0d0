import json
import sys

import pytest
import torch

from rainfusion.tools.bench import run_bench
from rainfusion.tools.cli import main


def one_line_error(argv: list[str], capsys) -> str:
    """The CLI's stderr for ``argv``, asserted to be one line ``error: ...`` with exit code 2."""
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err.rstrip("\n")



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
    assert one_line_error(["bench", "--heads", "0", "--no-progress"], capsys) == \
        "error: argument --heads: expected an integer >= 1, got '0'"
    assert "argument --dtype: invalid choice: 'float64'" in one_line_error(["bench", "--dtype", "float64"], capsys)


# the same option checks in all three commands (generate's required options given, so only the value is wrong)
COMMANDS = {"bench": ["bench"], "generate": ["generate", "--model", "m", "--prompt", "p"], "demo": ["demo"]}


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="this torch has CUDA")
@pytest.mark.parametrize("command", COMMANDS)
def test_cuda_on_a_cpu_only_torch_says_use_cpu(command, capsys):
    assert one_line_error([*COMMANDS[command], "--device", "cuda"], capsys) == \
        "error: argument --device: this torch has no CUDA (a CPU-only build), got 'cuda'; use --device cpu"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_gpu_index_this_machine_lacks_is_an_error(command, capsys):
    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (or the first of none)
    err = one_line_error([*COMMANDS[command], "--device", device], capsys)
    assert err.startswith("error: argument --device: ") and f"got {device!r}" in err


def test_a_gpu_index_past_the_last_names_the_gpus(monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert one_line_error(["bench", "--device", "cuda:7"], capsys) == \
        "error: argument --device: this machine has 2 cuda device(s), cuda:0 to cuda:1, got 'cuda:7'"


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_where_there_is_none_says_use_cpu(capsys):
    assert one_line_error(["bench", "--device", "mps"], capsys) == \
        "error: argument --device: no mps device is available here, got 'mps'; use --device cpu"


@pytest.mark.parametrize("device,expected", [
    ("tpu", "expected a torch device such as cpu, cuda, cuda:1 or mps, got 'tpu'"),
    ("cuda:x", "expected a torch device such as cpu, cuda, cuda:1 or mps, got 'cuda:x'"),
    ("meta", "expected a device to compute on (cpu, cuda, mps, xpu), got 'meta'"),
])
def test_devices_torch_cannot_compute_on_are_errors(device, expected, capsys):
    assert one_line_error(["demo", "--device", device], capsys) == f"error: argument --device: {expected}"


@pytest.mark.parametrize("command,option", [
    ("bench", "--repeats"), ("bench", "--batch"), ("bench", "--heads"),
    ("generate", "--steps"), ("generate", "--frames"), ("generate", "--height"), ("generate", "--width"),
    ("generate", "--fps"), ("demo", "--clips"), ("demo", "--steps"),
])
@pytest.mark.parametrize("value", ["0", "-3", "2.5"])
def test_counts_and_sizes_must_be_positive_integers(command, option, value, capsys):
    assert one_line_error([*COMMANDS[command], option, value], capsys) == \
        f"error: argument {option}: expected an integer >= 1, got {value!r}"


@pytest.mark.parametrize("option,value,expected", [
    ("--sparsity", "1", "a number in [0, 1)"), ("--sparsity", "-0.1", "a number in [0, 1)"),
    ("--sparsity", "nan", "a number in [0, 1)"),
    ("--guidance-scale", "-1", "a finite number >= 0"), ("--guidance-scale", "inf", "a finite number >= 0"),
    ("--seed", "-1", "an integer in [0, 2**64)"), ("--seed", str(2**64), "an integer in [0, 2**64)"),
])
def test_numbers_out_of_range_are_errors(option, value, expected, capsys):
    assert one_line_error([*COMMANDS["generate"], option, value], capsys) == \
        f"error: argument {option}: expected {expected}, got {value!r}"


def test_outputs_that_cannot_be_written_are_errors(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    under_a_file = str(a_file / "out.json")
    for argv, option in ((["bench", "--json", under_a_file], "--json"), (["bench", "--plot", under_a_file], "--plot"),
                         ([*COMMANDS["generate"], "--out", under_a_file], "--out")):
        assert one_line_error(argv, capsys) == \
            f"error: argument {option}: expected a path that can be written, got {under_a_file!r}: {a_file} is a file"
    assert one_line_error(["bench", "--plot", str(tmp_path)], capsys) == \
        f"error: argument --plot: expected a file name, got {str(tmp_path)!r}, which is a folder"
    assert one_line_error(["demo", "--out", str(a_file)], capsys) == \
        f"error: argument --out: expected a folder, got {str(a_file)!r}, which is a file"


def test_bench_writes_into_folders_it_creates(tmp_path, capsys):
    out_json = tmp_path / "new" / "folder" / "bench.json"
    assert main(["bench", "--heads", "1", "--repeats", "1", "--no-progress", "--methods", "dense",
                 "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["results"][0]["method"] == "dense"


def test_bench_plot_without_matplotlib_fails_before_the_benchmark(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it raises ImportError
    monkeypatch.delitem(sys.modules, "rainfusion.tools.plots", raising=False)  # imported afresh
    monkeypatch.setattr("rainfusion.tools.bench.run_bench", lambda *args, **kwargs: pytest.fail("the benchmark ran"))
    assert one_line_error(["bench", "--plot", str(tmp_path / "bench.png"), "--no-progress"], capsys) == \
        'error: --plot needs matplotlib: pip install "rainfusion[plot]"'


def test_run_bench_rejects_zero_repeats():
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        run_bench(repeats=0)
