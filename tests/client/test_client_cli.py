"""The tensorwire command against a real server: info, infer, stats, load and unload,
files, errors, progress.

Most tests call ``main`` in-process (fast); one runs ``python -m tensorwire``.
A .npy --output for a model that returns several outputs is a usage error (exit 2):
the command line asked for something the result cannot fit, and nothing is written.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import start
from support.repo_fixtures import make_repository

from tensorwire import Client, Progress, VersionStatistics
from tensorwire.cli import ProgressBar, format_statistics, main, write_outputs
from tensorwire_server.settings import Settings


def save(path: Path, arr: np.ndarray) -> str:
    np.save(path, arr)
    return str(path)


def infer(address: str, *args: str) -> int:
    return main(["--target", address, "infer", *args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_info_prints_versions_device_models_and_functions(
    address: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORWIRE_TARGET", address)  # the default --target
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"server:    {address}, tensorwire 0.1.0, torch " in out
    assert "device:    cpu (" in out
    assert "  mlp (input: float32[?, 16]) -> (output: float32[?, 4])" in out
    assert "builtin, 1,732 parameters: A 16-32-32-4 tanh MLP" in out
    assert "      READY; version 1; batch <= 1024, dynamic (delay " in out
    assert "      READY; version 1; on cpu\n" in out  # identity: no batching
    assert "  echo (**named) -> (?)" in out
    assert "  two_heads (x: float64[?], y: float64[?]) -> (sum: any, prod: any)" in out
    assert "functions: " in out


def test_info_json_is_the_whole_server_info(
    address: str, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--target", address, "info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    info = client.info()
    assert data["server_version"] == info.server_version
    assert data["device"]["name"] == "cpu"
    assert set(data["models"]) == set(info.models)
    mlp = data["models"]["mlp"]
    assert mlp["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 16]}]
    assert mlp["variadic"] is False and mlp["parameter_count"] == 1732
    assert data["functions"] == info.functions


def test_infer_npy_to_npy_through_identity_is_bit_exact(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(0).standard_normal((3, 5, 7))
    x[0, 0, 0] = np.nan
    x = np.asfortranarray(x)  # the file's layout must not matter
    src = save(tmp_path / "x.npy", x)
    assert infer(address, "identity", "--input", src, "--output", str(tmp_path / "y.npy")) == 0
    y = np.load(tmp_path / "y.npy")
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.tobytes() == np.ascontiguousarray(x).tobytes()
    captured = capsys.readouterr()
    assert captured.out == f"identity: output float64[3, 5, 7] -> {tmp_path / 'y.npy'}\n"
    assert captured.err == ""  # no bar when stderr is not a terminal
    assert sorted(os.listdir(tmp_path)) == ["x.npy", "y.npy"]  # no temp file left


def test_named_inputs_and_npz_go_in_and_every_output_comes_out_as_npz(
    address: str, tmp_path: Path
) -> None:
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    b, c = np.array([True, False]), np.linspace(0, 1, 4, dtype=np.float16)
    np.savez(tmp_path / "bc.npz", b=b, c=c)
    out = tmp_path / "out.npz"
    args = ["--input", f"a={save(tmp_path / 'a.npy', a)}", "--input", str(tmp_path / "bc.npz")]
    assert infer(address, "echo", *args, "--output", str(out)) == 0
    with np.load(out, allow_pickle=False) as got:
        assert sorted(got.files) == ["a", "b", "c"]
        for name, want in {"a": a, "b": b, "c": c}.items():
            assert got[name].dtype == want.dtype
            np.testing.assert_array_equal(got[name], want)


def test_outputs_selects_and_npz_names_may_be_anything(address: str, tmp_path: Path) -> None:
    # "file" and "allow_pickle" are np.savez's own parameters, which np.savez refuses as
    # array names; the command writes them (and reads them) all the same.
    arrays = {"file": np.ones(2), "allow_pickle": np.zeros(3), "x": np.ones(1)}
    write_outputs(tmp_path / "in.npz", arrays)
    out = tmp_path / "out.npz"
    args = ["--input", str(tmp_path / "in.npz"), "--outputs", "file", "allow_pickle"]
    assert infer(address, "echo", *args, "--output", str(out)) == 0
    with np.load(out, allow_pickle=False) as got:
        assert sorted(got.files) == ["allow_pickle", "file"]
        np.testing.assert_array_equal(got["file"], arrays["file"])
        np.testing.assert_array_equal(got["allow_pickle"], arrays["allow_pickle"])


def test_mlp_output_equals_the_client_result(address: str, client: Client, tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((9, 16)).astype(np.float32)
    src = save(tmp_path / "x.npy", x)
    assert infer(address, "mlp", "--input", src, "--output", str(tmp_path / "y.npy")) == 0
    want = client.infer("mlp", x)["output"]
    got = np.load(tmp_path / "y.npy")
    assert got.dtype == np.float32 and got.shape == (9, 4)
    np.testing.assert_array_equal(got, want)


def test_several_outputs_to_one_npy_is_a_usage_error_naming_them(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = save(tmp_path / "a.npy", np.ones(2)), save(tmp_path / "b.npy", np.zeros(2))
    inputs = ["--input", f"first={a}", "--input", f"second={b}"]
    y = tmp_path / "y.npy"
    assert infer(address, "echo", *inputs, "--output", str(y)) == 2
    err = capsys.readouterr().err
    assert "returned 2 outputs (first, second)" in err and ".npz" in err and "--outputs" in err
    assert not y.exists()
    # --outputs picks one, which then fits a .npy file.
    assert infer(address, "echo", *inputs, "--outputs", "second", "--output", str(y)) == 0
    np.testing.assert_array_equal(np.load(y), np.zeros(2))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input", "missing.npy", "--output", "y.npy"], "missing.npy: no such file"),
        (["--input", "x=missing.npy", "--output", "y.npy"], "missing.npy: no such file"),
        (["--input", "x.npy", "--output", "y.txt"], "must end in .npy"),
        (["--input", "x.npy", "--output", "nowhere/y.npy"], "no such directory"),
        (["--input", "x.npy", "--input", "b=x.npy", "--output", "y.npy"], "not a mix"),
        (["--input", "x=x.npy", "--input", "x=x.npy", "--output", "y.npz"], "given twice"),
        (["--input", "n=x.npz", "--output", "y.npz"], "drop the NAME="),
        (["--input", "x.txt", "--output", "y.npy"], "not a .npy or .npz file"),
        (["--input", "x.npy", "--outputs", "a", "b", "--output", "y.npy"], "use .npz"),
    ],
)
def test_usage_errors_exit_2_with_a_message(
    args: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    np.save("x.npy", np.ones(3))
    np.savez("x.npz", a=np.ones(3))
    Path("x.txt").write_text("not an array")
    # An unreachable target: each of these fails before any call is made.
    assert main(["--target", f"127.0.0.1:{free_port()}", "infer", "identity", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensorwire: ") and message in err
    assert "Traceback" not in err
    assert not any(p.name.startswith("y") for p in tmp_path.iterdir())


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["infer", "identity", "--input", "x.npy"])  # no --output
    assert exc.value.code == 2 and "--output" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--timeout", "-1", "info"])
    assert exc.value.code == 2 and "more than 0 seconds" in capsys.readouterr().err


def test_pickled_arrays_are_refused_not_unpickled(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    objects = np.array([{"a": 1}, None], dtype=object)
    np.save(tmp_path / "o.npy", objects, allow_pickle=True)
    np.savez(tmp_path / "o.npz", o=objects)
    for src in ("o.npy", "o.npz"):
        args = ["--input", str(tmp_path / src), "--output", str(tmp_path / "y.npz")]
        assert infer(address, "echo", *args) == 2
        err = capsys.readouterr().err
        assert "Python objects" in err and "refusing to unpickle" in err
    assert not (tmp_path / "y.npz").exists()


def test_server_errors_exit_1_with_code_and_message(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--input", save(tmp_path / "x.npy", np.ones(3)), "--output", str(tmp_path / "y.npy")]
    assert infer(address, "no_such_model", *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("tensorwire: NOT_FOUND: ") and "no_such_model" in err
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]


def test_unreachable_target_exits_1_with_unavailable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{free_port()}"
    assert main(["--target", target, "--timeout", "30", "info"]) == 1
    prefix = f"tensorwire: UNAVAILABLE: cannot reach tensorwire server at {target}: "
    assert capsys.readouterr().err.startswith(prefix)
    args = ["--input", save(tmp_path / "x.npy", np.ones(3)), "--output", str(tmp_path / "y.npy")]
    assert main(["--target", target, "--timeout", "30", "infer", "identity", *args]) == 1
    assert capsys.readouterr().err.startswith("tensorwire: UNAVAILABLE: ")
    assert sorted(os.listdir(tmp_path)) == ["x.npy"]


def test_forced_progress_draws_both_stages_to_100_percent(
    address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.zeros(5 << 20, dtype=np.uint8)  # above the stream threshold: streamed both ways
    src = save(tmp_path / "x.npy", x)
    y = str(tmp_path / "y.npy")
    assert infer(address, "identity", "--input", src, "--output", y, "--progress") == 0
    err = capsys.readouterr().err
    lines = err.split("\n")
    assert lines[-1] == ""  # ends with a newline
    assert lines[0].startswith("\rupload") and lines[1].startswith("\rdownload")
    for line in lines[:2]:
        assert line.rsplit("\r", 1)[-1].split("]")[1].startswith(" 100%  5.00/5.00 MiB")
    assert infer(address, "identity", "--input", src, "--output", y, "--no-progress") == 0
    assert capsys.readouterr().err == ""


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_throttles_but_always_draws_start_and_end() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, clock=clock, interval=0.1)
    mib = 1 << 20
    total = 100 * mib
    bar(Progress("upload", 0, total))  # a stage's start: drawn
    for done in range(1, 100):  # 99 chunks in 0.099 s: all within one interval
        clock.now += 0.001
        bar(Progress("upload", done * mib, total))
    assert stream.getvalue().count("\r") == 1
    clock.now = 100.5
    bar(Progress("upload", 99 * mib, total))  # the interval passed: drawn
    assert stream.getvalue().count("\r") == 2
    bar(Progress("upload", total, total))  # 100%: drawn at once, then a newline
    bar(Progress("upload", total, total))  # a repeated end: not drawn again
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    last = text.rsplit("\r", 1)[1]
    assert "upload   [########################] 100%  100.00/100.00 MiB" in last
    assert "200.00 MiB/s" in last  # 100 MiB in 0.5 s

    bar(Progress("download", 0, 12))  # a unary call: start and end at once
    bar(Progress("download", 12, 12))
    bar.close()  # nothing open: no extra newline
    line = stream.getvalue().split("\n")[1].rsplit("\r", 1)[1]
    assert line.rstrip() == "download [########################] 100%  12/12 B"
    assert stream.getvalue().count("\n") == 2


def test_progress_bar_blanks_leftovers_and_close_ends_an_open_line() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, clock=clock, interval=0.1)
    bar(Progress("upload", 0, 3 << 30))
    clock.now += 1.0
    bar(Progress("upload", 1 << 30, 3 << 30))
    first, second = stream.getvalue().split("\r")[1:]
    assert "  0%  0.00/3.00 GiB" in first and " 33%  1.00/3.00 GiB  1.00 GiB/s" in second
    assert len(second) >= len(first)
    bar.close()  # the call failed midway: the line still ends
    assert stream.getvalue().endswith("GiB/s\n")


def test_progress_bar_draws_a_retried_stage_on_a_new_line() -> None:
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(stream, clock=clock, interval=0.1)
    bar(Progress("upload", 0, 100))
    clock.now += 1.0
    bar(Progress("upload", 60, 100))  # the server went away here: the call is retried
    bar(Progress("upload", 0, 100))
    bar(Progress("upload", 100, 100))
    first, second = stream.getvalue().split("\n")[:2]
    assert " 60%  60/100 B" in first.rsplit("\r", 1)[1]
    assert "100%  100/100 B" in second.rsplit("\r", 1)[1]
    assert stream.getvalue().count("\n") == 2


def test_python_dash_m_tensorwire_runs_infer(address: str, tmp_path: Path) -> None:
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    save(tmp_path / "x.npy", x)
    command = ["-m", "tensorwire", "--target", address, "infer", "mlp"]
    done = subprocess.run(
        [sys.executable, *command, "--input", "x.npy", "--output", "y.npz"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "mlp: output float32[2, 4] -> y.npz\n"
    with np.load(tmp_path / "y.npz", allow_pickle=False) as got:
        assert got["output"].shape == (2, 4)


def test_the_command_does_not_import_torch() -> None:
    script = (
        "import sys; sys.modules['torch'] = None; import tensorwire.cli; "
        "assert not any(m.startswith('torch') for m in sys.modules if sys.modules[m])"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------- stats


def stats_row(out: str, model: str, version: int) -> list[str]:
    """The cells of ``model`` ``version``'s row of a stats table."""
    lines = out.splitlines()
    assert lines[0].split()[:6] == [
        "model",
        "version",
        "requests",
        "failures",
        "inferences",
        "executions",
    ]
    for line in lines[1:]:
        cells = line.split()
        if cells[:2] == [model, str(version)]:
            return cells
    raise AssertionError(f"no row for {model} {version} in:\n{out}")


def test_stats_prints_a_row_per_version(
    address: str, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(2):
        client.infer("mlp64", np.ones((7, 16)))
    assert main(["--target", address, "stats", "mlp64", "--version", "1"]) == 0
    out = capsys.readouterr().out
    (stats,) = client.model_statistics("mlp64", 1)
    assert len(out.splitlines()) == 2  # the header and one version
    cells = stats_row(out, "mlp64", 1)
    assert cells[2:6] == [
        str(stats.requests),
        str(stats.failures),
        str(stats.inferences),
        str(stats.executions),
    ]
    assert float(cells[6]) >= 0 and float(cells[7]) > 0  # mean queue and compute ms
    assert f"7:{stats.batch_sizes[7]}" in cells[8:]
    # Every model, every version, sorted by model.
    assert main(["--target", address, "stats"]) == 0
    out = capsys.readouterr().out
    models = [line.split()[0] for line in out.splitlines()[1:]]
    assert models == sorted(models) and {"identity", "mlp", "mlp64"} <= set(models)
    stats_row(out, "identity", 1)


def test_stats_json_is_the_client_result(
    address: str, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    client.infer("mlp", np.ones((3, 16), np.float32))
    assert main(["--target", address, "stats", "mlp", "--json"]) == 0
    (data,) = json.loads(capsys.readouterr().out)
    (stats,) = client.model_statistics("mlp")
    assert data["model"] == "mlp" and data["version"] == 1
    assert data["requests"] == stats.requests and data["executions"] == stats.executions
    assert {int(k): v for k, v in data["batch_sizes"].items()} == stats.batch_sizes


def test_stats_errors(address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--target", address, "stats", "no_such_model"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tensorwire: NOT_FOUND: ") and "no_such_model" in err
    assert main(["--target", address, "stats", "mlp", "--version", "2"]) == 1
    assert capsys.readouterr().err.startswith("tensorwire: NOT_FOUND: ")
    for command in ("stats", "unload"):
        with pytest.raises(SystemExit) as exc:
            main(["--target", address, command, "mlp", "--version", "-1"])
        assert exc.value.code == 2 and "must be 0 or more" in capsys.readouterr().err


def test_format_statistics_means_and_notes() -> None:
    busy = VersionStatistics(
        model="scaler",
        version=2,
        requests=4,
        failures=2,
        inferences=6,
        executions=2,
        queue_seconds=0.004,
        compute_seconds=0.010,
        batch_sizes={4: 1, 2: 1},
        rejected=1,
        expired=1,
    )
    idle = VersionStatistics(model="scaler", version=1)
    lines = format_statistics([busy, idle]).splitlines()
    assert lines[0].startswith("model   version  requests")  # "model" padded to "scaler"
    assert lines[1].split() == ["scaler", "2", "4", "2", "6", "2", "1.000", "5.000", "2:1", "4:1"]
    assert lines[2].split() == ["scaler", "1", "0", "0", "0", "0", "-", "-", "-"]
    assert lines[3] == (
        "scaler version 2: 1 rejected (queue full), 1 expired (deadline passed in the queue)"
    )
    assert len(lines) == 4
    end = lines[0].index("executions") + len("executions")  # numbers align right
    assert lines[1][end - 2 : end + 1] == " 2 " and lines[2][end - 2 : end + 1] == " 0 "
    assert format_statistics([]) == "no model versions serving"


# ---------------------------------------------------------------------- load, unload


@pytest.fixture
def repo_address(tmp_path: Path) -> Iterator[str]:
    """A CPU server over a fresh repository (scaler, regressor) with explicit control."""
    repo = make_repository(tmp_path / "repo")
    yield from start(
        Settings(
            host="127.0.0.1",
            port=0,
            device="cpu",
            builtins=False,
            model_repo=str(repo),
            model_control="explicit",
        )
    )


def test_unload_and_load_change_what_infer_runs(
    repo_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    args = ["--input", save(tmp_path / "x.npy", x), "--output", str(tmp_path / "y.npy")]
    assert main(["--target", repo_address, "info"]) == 0
    out = capsys.readouterr().out
    assert "      READY; versions 2, 1; batch <= 32, dynamic (delay 1 ms); on cpu\n" in out
    assert "      READY; versions 2, 1; batch <= 8; on cpu\n" in out  # regressor

    assert main(["--target", repo_address, "unload", "scaler", "--version", "2"]) == 0
    assert capsys.readouterr().out == "scaler: unloaded version 2\n"
    assert infer(repo_address, "scaler", "--version", "2", *args) == 1
    assert capsys.readouterr().err.startswith("tensorwire: NOT_FOUND: ")
    assert infer(repo_address, "scaler", *args) == 0  # the newest left: version 1
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), x * 2)
    capsys.readouterr()
    assert main(["--target", repo_address, "unload", "scaler", "--version", "2"]) == 1
    assert capsys.readouterr().err.startswith("tensorwire: NOT_FOUND: ")

    assert main(["--target", repo_address, "load", "scaler"]) == 0
    assert capsys.readouterr().out == "scaler: loaded, serving versions 2, 1\n"
    assert infer(repo_address, "scaler", "--version", "2", *args) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), x * 3)
    capsys.readouterr()

    assert main(["--target", repo_address, "unload", "regressor"]) == 0
    assert capsys.readouterr().out == "regressor: unloaded every version\n"
    assert main(["--target", repo_address, "load", "no_such_model"]) == 1
    assert capsys.readouterr().err.startswith("tensorwire: NOT_FOUND: ")


def test_load_and_unload_without_explicit_control_exit_1(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["load", "mlp"], ["unload", "mlp"], ["unload", "mlp", "--version", "1"]):
        assert main(["--target", address, *command]) == 1
        err = capsys.readouterr().err
        assert err.startswith("tensorwire: FAILED_PRECONDITION: ") and "explicit" in err
