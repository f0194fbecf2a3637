"""plots.py and `pocketgpt plot`, on a fake run folder (no training, no torch needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from helpers import PLOT_NAMES, fake_metrics, make_run, run_cli  # noqa: E402
from pocketgpt.errors import PocketError  # noqa: E402
from pocketgpt.plots import compare_runs, write_plots  # noqa: E402
from pocketgpt.report import write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_size: tuple[int, int] = (600, 350)) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    height, width = imread(path).shape[:2]
    assert width >= min_size[0] and height >= min_size[1], (path, width, height)
    assert width <= 2000 and height <= 1200, (path, width, height)


# ---------------------------------------------------------------- write_plots

def test_write_plots_draws_every_picture(tmp_path):
    run = make_run(tmp_path)
    paths = write_plots(run)
    assert [p.name for p in paths] == PLOT_NAMES
    for p in paths:
        assert p.parent == run / "plots"
        assert_png(p)
    assert not [p for p in (run / "plots").iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_write_plots_replaces_pictures_in_place(tmp_path):
    run = make_run(tmp_path)
    first = write_plots(run)
    second = write_plots(run)
    assert first == second
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(PLOT_NAMES)


def test_empty_metrics_draws_nothing_and_does_not_crash(tmp_path):
    run = make_run(tmp_path)
    (run / "metrics.jsonl").write_text("")
    assert write_plots(run) == []
    assert not (run / "plots").exists()
    text = write_report(run).read_text()
    assert "**Best val loss:**" in text and "at iter" in text  # from last/state.json when the log is empty
    (run / "last" / "state.json").unlink()
    assert "no evaluation yet" in write_report(run).read_text()


def test_one_line_metrics_draws_what_it_can(tmp_path):
    run = make_run(tmp_path)
    (run / "metrics.jsonl").write_text(json.dumps({"iter": 10, "loss": 4.1, "lr": 1e-4, "grad_norm": "nan",
                                                   "tokens_per_s": 1000.0, "ms_per_iter": 70.0}) + "\n")
    names = [p.name for p in write_plots(run)]
    assert names == ["loss.png", "lr.png", "step_time.png", "tokens_per_s.png"]  # grad_norm has no finite value
    for name in names:
        assert_png(run / "plots" / name)


def test_only_eval_lines(tmp_path):
    run = make_run(tmp_path)
    (run / "metrics.jsonl").write_text(json.dumps({"iter": 250, "train_loss": 2.0, "val_loss": 2.1}) + "\n")
    assert [p.name for p in write_plots(run)] == ["loss.png"]


def test_bits_per_byte_after_the_data_changed(tmp_path):
    """A resume on other data changes bytes per token: bpb gets its own line instead of a derived axis."""
    run = make_run(tmp_path)
    lines = [{"iter": 250 * i, "train_loss": 2.0, "val_loss": 2.1, "val_bpb": 3.0 + i} for i in range(1, 4)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert_png(write_plots(run)[0])


def test_without_matplotlib_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(PocketError, match="pip install"):
        write_plots(make_run(tmp_path))


def test_a_folder_without_metrics_is_refused(tmp_path):
    with pytest.raises(PocketError, match="not a pocketgpt run folder"):
        write_plots(tmp_path)
    with pytest.raises(PocketError, match="not a folder"):
        write_plots(tmp_path / "missing")


# ---------------------------------------------------------------- compare_runs

def test_compare_runs_writes_one_png(tmp_path):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b", n_iters=2000, scale=0.9)
    out = compare_runs([a, b], tmp_path / "figs" / "cmp.png")
    assert out == tmp_path / "figs" / "cmp.png"
    assert_png(out, min_size=(1000, 400))


def test_compare_runs_without_tokens_seen_uses_the_config(tmp_path):
    run = make_run(tmp_path)
    old = [{k: v for k, v in r.items() if k != "tokens_seen"} for r in fake_metrics(1000)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert_png(compare_runs([run, make_run(tmp_path, "other")], tmp_path / "c.png"), min_size=(1000, 400))


def test_compare_runs_refuses_a_non_run(tmp_path):
    with pytest.raises(PocketError, match="no metrics.jsonl"):
        compare_runs([make_run(tmp_path), tmp_path], tmp_path / "c.png")


# ---------------------------------------------------------------- CLI

def test_plot_cli_one_run(tmp_path, capsys):
    run = make_run(tmp_path)
    code, out, err = run_cli(capsys, "plot", run)
    assert code == 0, err
    printed = out.split()
    assert printed == [str(run / "plots" / n) for n in PLOT_NAMES] + [str(run / "report.md")]


def test_plot_cli_on_a_full_disk_is_one_line_and_keeps_the_earlier_pictures(tmp_path, capsys, monkeypatch):
    import errno

    from matplotlib.figure import Figure

    run = make_run(tmp_path)
    assert run_cli(capsys, "plot", run)[0] == 0
    before = {p.name: p.read_bytes() for p in (run / "plots").iterdir()}

    def full(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a png")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    code, _, err = run_cli(capsys, "plot", run)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: could not write {run / 'plots' / 'loss.png'}: no space left on device (")
    assert err.endswith("; the earlier loss.png is kept: free some space and try again\n")
    assert {p.name: p.read_bytes() for p in (run / "plots").iterdir()} == before  # no temp, nothing half-drawn


def test_plot_cli_several_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, "a"), make_run(tmp_path, "b")
    code, out, err = run_cli(capsys, "plot", "a", "b")
    assert code == 0, err
    assert out.strip() == "runs-compare.png"
    assert_png(tmp_path / "runs-compare.png", min_size=(1000, 400))
    code, out, _ = run_cli(capsys, "plot", "a", "b", "--out", "x/cmp.png")
    assert code == 0 and out.strip() == "x/cmp.png"
    assert_png(tmp_path / "x" / "cmp.png", min_size=(1000, 400))


def test_plot_cli_refuses_a_non_run_in_one_line(tmp_path, capsys):
    code, out, err = run_cli(capsys, "plot", tmp_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "not a pocketgpt run folder" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "plot", make_run(tmp_path), tmp_path / "nope")
    assert code == 2 and err.count("\n") == 1


def test_plot_cli_does_not_import_torch(tmp_path):
    run = make_run(tmp_path)
    code = ("import sys; from pocketgpt.cli import main; rc = main(['plot', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
