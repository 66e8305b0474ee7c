"""The driver's file of requests (EV_Driver.requests_file) and its command line."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from EV_Driver.config import ExitCode, parse_settings
from EV_Driver.requests_file import (
    MAX_BYTES,
    MAX_LINES,
    RequestsFileError,
    decode_requests,
    load_requests,
    parse_requests,
)
from shared.errors import ConfigError


def test_one_cp_id_a_line_with_comments_and_blanks() -> None:
    text = "# morning run\nCP001\n\n   CP002  \nCP003 # near the door\n#CP004\nCP001\n"
    result = parse_requests(text)
    assert result.cp_ids == ("CP001", "CP002", "CP003", "CP001")
    assert result.problems == ()


def test_bad_lines_are_skipped_with_their_line_numbers() -> None:
    text = "CP001\nCP 002\n\nCP/003\nCP004\n" + "x" * 33 + "\n"
    result = parse_requests(text)
    assert result.cp_ids == ("CP001", "CP004")
    assert [p.line for p in result.problems] == [2, 4, 6]
    assert "'CP 002' is not a valid CP id" in str(result.problems[0])
    assert str(result.problems[1]).startswith("line 4: ")


def test_no_valid_line_is_an_error_naming_the_first_problem() -> None:
    with pytest.raises(RequestsFileError, match=r"f.txt: no valid CP id \(line 2: 'bad id'"):
        parse_requests("# only bad\nbad id\nworse!\n", source="f.txt")


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing\n   # here\n"])
def test_empty_file_is_an_error(text: str) -> None:
    with pytest.raises(RequestsFileError, match="no CP ids"):
        parse_requests(text)


def test_line_limit() -> None:
    assert len(parse_requests("CP1\n" * MAX_LINES).cp_ids) == MAX_LINES
    with pytest.raises(RequestsFileError, match=f"more than {MAX_LINES} lines"):
        parse_requests("CP1\n" * (MAX_LINES + 1))


def test_size_limit_and_encoding() -> None:
    with pytest.raises(RequestsFileError, match="larger than the 64 KiB limit"):
        decode_requests(b"#" * (MAX_BYTES + 1))
    with pytest.raises(RequestsFileError, match="not UTF-8"):
        decode_requests(b"CP001\n\xff\n")
    assert decode_requests("\ufeffCP001\r\nCP002\r\n".encode()).cp_ids == ("CP001", "CP002")


@pytest.mark.parametrize(
    ("data", "where"),
    [
        (b"CP001\nCP002\nCP\xff03\n", r"line 3: not UTF-8 \(byte 0xff at column 3\)"),
        (b"\xff", r"line 1: not UTF-8 \(byte 0xff at column 1\)"),
        # The byte order mark is not a column; "é" is one column, though two bytes.
        ("\ufeffCP001\n# café\xa0".encode() + b"\xc3(", r"line 2: .*byte 0xc3 at column 8\)"),
        (b"CP001\r\nCP002\r\n\x80", r"line 3: .*byte 0x80 at column 1\)"),
        (b"CP001\n# ends mid-character \xe2\x82", r"line 2: .*byte 0xe2 at column 22\)"),
    ],
)
def test_bad_encoding_names_the_line_and_column(data: bytes, where: str) -> None:
    with pytest.raises(RequestsFileError, match=rf"^requests.txt {where}$"):
        decode_requests(data, "requests.txt")


def test_load_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "requests.txt"
    path.write_text("CP001\nCP002\n")
    assert load_requests(path).cp_ids == ("CP001", "CP002")


def test_load_names_the_line_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "requests.txt"
    path.write_bytes(b"CP001\n# Lat\xedn-1 comment\nCP002\n")
    with pytest.raises(RequestsFileError, match=r"requests.txt line 2: not UTF-8 \(byte 0xed"):
        load_requests(path)


def test_load_reports_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(RequestsFileError, match="cannot read .*missing.txt"):
        load_requests(tmp_path / "missing.txt")


def test_load_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(RequestsFileError, match="a directory, not a regular file"):
        load_requests(tmp_path)


@pytest.mark.skipif(not os.path.exists(os.devnull), reason="no null device")
def test_load_refuses_a_device() -> None:
    with pytest.raises(RequestsFileError, match="a character device, not a regular file"):
        load_requests(os.devnull)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets")
def test_load_refuses_a_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative name: socket paths are limited to about 100 bytes
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind("s.sock")
        with pytest.raises(RequestsFileError, match="a socket, not a regular file"):
            load_requests("s.sock")


def load_in_a_thread(path: Path, fifo: Path, seconds: float = 3.0) -> str:
    """load_requests(path)'s error; fails the test if it blocks on `fifo` for `seconds`."""
    result: dict[str, Any] = {}

    def load() -> None:
        try:
            load_requests(path)
        except RequestsFileError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        # Open the writing end so that the blocked reader returns and the test run goes on.
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        thread.join(seconds)
        pytest.fail(f"load_requests({path.name}) waited for a writer on a named pipe")
    assert "error" in result, "a named pipe was accepted"
    return str(result["error"])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_load_refuses_a_named_pipe_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "requests.fifo"
    os.mkfifo(fifo)
    error = load_in_a_thread(fifo, fifo)
    assert error == f"cannot read {fifo}: a named pipe (FIFO), not a regular file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_load_checks_again_after_opening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The path is a regular file when checked and a named pipe when opened (swapped between
    # the two): the open must not block, and the opened file is checked again.
    fifo = tmp_path / "requests.fifo"
    os.mkfifo(fifo)
    regular = tmp_path / "regular.txt"
    regular.write_text("CP001\n")
    real_stat = os.stat

    def stat_before_the_swap(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        return real_stat(regular if str(path) == str(fifo) else path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_before_the_swap)
    error = load_in_a_thread(fifo, fifo)
    assert "a named pipe (FIFO), not a regular file" in error


def test_load_refuses_a_huge_file_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.txt"
    with path.open("wb") as stream:
        stream.truncate(10 * 1024 * 1024)  # sparse: nothing is written
    with pytest.raises(
        RequestsFileError, match=r"huge.txt: larger than the 64 KiB limit \(10485760 bytes\)"
    ):
        load_requests(path)


# --- the command line -------------------------------------------------------------------


BASE = ["--broker", "localhost:9092", "--driver-id", "D1"]


def test_settings_from_cp_flag() -> None:
    settings = parse_settings([*BASE, "--cp", "CP001", "--json", "--pause", "0"], environ={})
    assert settings.cp_ids == ("CP001",)
    assert settings.json and settings.pause == 0.0
    assert settings.reply_timeout == 10.0
    assert settings.broker == "localhost:9092"


def test_settings_from_file(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    path.write_text("CP001\nbad id\nCP002\n")
    settings = parse_settings([*BASE, "--file", str(path)], environ={})
    assert settings.cp_ids == ("CP001", "CP002")
    assert settings.source == str(path)
    assert [p.line for p in settings.file_problems] == [2]


def test_settings_from_environment(tmp_path: Path) -> None:
    environ = {
        "EV_BROKER": "kafka:9092",
        "EV_DRIVER_ID": "D7",
        "EV_CP": "CP009",
        "EV_JSON": "true",
        "EV_PAUSE": "1.5",
        "EV_REPLY_TIMEOUT": "2",
        "EV_LOG_LEVEL": "debug",
    }
    settings = parse_settings([], environ=environ)
    assert (settings.broker, settings.driver_id, settings.cp_ids) == (
        "kafka:9092",
        "D7",
        ("CP009",),
    )
    assert settings.json and settings.pause == 1.5 and settings.reply_timeout == 2.0
    assert settings.log_level == "DEBUG"


def test_command_line_target_wins_over_environment(tmp_path: Path) -> None:
    path = tmp_path / "r.txt"
    path.write_text("CP005\n")
    settings = parse_settings([*BASE, "--file", str(path)], environ={"EV_CP": "CP001"})
    assert settings.cp_ids == ("CP005",)
    settings = parse_settings([*BASE, "--cp", "CP002"], environ={"EV_FILE": str(path)})
    assert settings.cp_ids == ("CP002",)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (BASE, {}, "one of --cp or --file is required"),
        ([*BASE, "--cp", "A", "--file", "f"], {}, "mutually exclusive"),
        (BASE, {"EV_CP": "A", "EV_FILE": "f"}, "EV_CP and EV_FILE"),
        (["--driver-id", "D1", "--cp", "A"], {}, "--broker"),
        (["--broker", "nohost", "--driver-id", "D1", "--cp", "A"], {}, "HOST:PORT"),
        ([*BASE[:3], "bad id", "--cp", "A"], {}, "not a valid id"),
        ([*BASE, "--cp", "CP 1"], {}, "not a valid id"),
        ([*BASE, "--cp", "A", "--reply-timeout", "0"], {}, "> 0"),
        ([*BASE, "--cp", "A", "--pause", "-1"], {}, ">= 0"),
        ([*BASE, "--cp", "A", "--log-level", "loud"], {}, "DEBUG"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(argv, environ=environ)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_bad_environment_or_file_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="EV_REPLY_TIMEOUT"):
        parse_settings([*BASE, "--cp", "A"], environ={"EV_REPLY_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="cannot read"):
        parse_settings([*BASE, "--file", str(tmp_path / "none.txt")], environ={})
    with pytest.raises(ConfigError, match="a directory, not a regular file"):
        parse_settings([*BASE, "--file", str(tmp_path)], environ={})


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(["--help"], environ={})
    assert caught.value.code == 0
    epilog = capsys.readouterr().out.split("exit codes:", 1)[1]
    for code in ExitCode:
        assert f"\n  {code.value}  " in epilog, code
