"""Transports: line framing, stdin/stdout (in-process and through a real subprocess), the Unix
socket listener and the in-process stream pair."""

from __future__ import annotations

import itertools
import os
import pty
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import anyio
import anyio.abc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.transports import (
    MAX_LINE,
    LineFramer,
    SocketInUse,
    SocketPathError,
    StdioStream,
    TooLarge,
    bind_unix,
    frame_lines,
    memory_stream_pair,
)

ROOT = Path(__file__).resolve().parents[2]

Item = bytes | TooLarge


def reference_lines(data: bytes, limit: int) -> list[Item]:
    """What framing must produce, computed on the whole input at once."""
    out: list[Item] = []
    for piece in data.split(b"\n"):
        line = piece[:-1] if piece.endswith(b"\r") else piece
        if len(line) > limit:
            out.append(TooLarge(limit))
        elif line and not line.isspace():
            out.append(line)
    return out


def frame(chunks: list[bytes], limit: int = MAX_LINE) -> list[Item]:
    framer = LineFramer(limit)
    out: list[Item] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
    return out + framer.finish()


# --- framing ------------------------------------------------------------------------------------


def test_lines_split_across_chunks_are_joined() -> None:
    data = b'{"id":"a"}\n{"id":"b"}\n{"id":"c"}\n'
    expected = [b'{"id":"a"}', b'{"id":"b"}', b'{"id":"c"}']
    assert frame([data]) == expected
    assert frame([data[i : i + 1] for i in range(len(data))]) == expected
    assert frame([data[:3], data[3:15], data[15:]]) == expected


def test_crlf_and_blank_lines() -> None:
    data = b"a\r\n\r\n  \n\t \r\nb\n\n\nc\r\n   x  \n"
    assert frame([data]) == [b"a", b"b", b"c", b"   x  "]


def test_only_json_whitespace_makes_a_line_blank() -> None:
    """Vertical tab and form feed are whitespace to Python, not to JSON: such a line is
    a line (answered malformed_json), or a pipelining client would miss a reply."""
    data = b"\x0b\n\x0c\n \t\n\x0b \r\n"
    expected = [b"\x0b", b"\x0c", b"\x0b "]
    assert frame([data]) == expected
    assert frame([data[i : i + 1] for i in range(len(data))]) == expected


def test_a_byte_order_mark_opening_the_stream_is_dropped() -> None:
    bom = b"\xef\xbb\xbf"
    data = bom + b"a\n" + bom + b"b\n"  # only the first one opens the stream
    expected = [b"a", bom + b"b"]
    assert frame([data]) == expected
    assert frame([data[i : i + 1] for i in range(len(data))]) == expected
    assert frame([bom[:2], bom[2:] + b"a"]) == [b"a"]  # no newline: at the end
    assert frame([bom[:2]]) == [bom[:2]]  # not a BOM after all: kept, as a line
    assert frame([b"\xef\xbbx\n"]) == [b"\xef\xbbx"]


def test_a_final_line_without_newline_still_counts() -> None:
    assert frame([b"a\nb"]) == [b"a", b"b"]
    assert frame([b"a\n", b"b\r"]) == [b"a", b"b"]
    assert frame([b"a\n", b"  "]) == [b"a"]


def test_a_line_of_exactly_the_limit_passes_and_one_more_byte_does_not() -> None:
    limit = 10
    exact, over = b"x" * limit, b"y" * (limit + 1)
    data = exact + b"\n" + over + b"\n" + exact + b"\r\n" + over + b"\r\nok\n"
    expected: list[Item] = [exact, TooLarge(limit), exact, TooLarge(limit), b"ok"]
    assert frame([data], limit) == expected
    assert frame([data[i : i + 3] for i in range(0, len(data), 3)], limit) == expected


def test_a_huge_line_is_one_marker_and_the_lines_after_it_survive() -> None:
    limit = 1000
    huge = b"z" * (50 * limit)
    chunks = [b"first\n" + huge[:100]] + [huge[i : i + 777] for i in range(100, len(huge), 777)]
    chunks.append(b"\nsecond\nthird")
    assert frame(chunks, limit) == [b"first", TooLarge(limit), b"second", b"third"]


def test_a_huge_line_without_newline_at_the_end_is_one_marker() -> None:
    limit = 100
    assert frame([b"a\n", b"q" * 5000], limit) == [b"a", TooLarge(limit)]
    assert frame([b"a\n"] + [b"q" * 64] * 100, limit) == [b"a", TooLarge(limit)]


def test_the_framer_never_holds_more_than_the_limit() -> None:
    limit = 1000
    framer = LineFramer(limit)
    seen: list[Item] = []
    for _ in range(500):
        seen += framer.feed(b"w" * 300)
        assert framer.buffered <= limit + 1
    seen += framer.feed(b"w\nnext\n")
    assert seen == [TooLarge(limit), b"next"]
    assert framer.buffered == 0


def test_many_lines_in_one_chunk() -> None:
    lines = [b'{"id":"m-%d","type":"verify"}' % i for i in range(10_000)]
    data = b"\n".join(lines) + b"\n"
    assert frame([data]) == lines
    assert frame([data[i : i + 65536] for i in range(0, len(data), 65536)]) == lines


PIECES = [b"a", b"bc", b"\n", b"\r", b"\r\n", b" ", b"\t", b"{}", b"\xff", b"0123456789"]


@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    limit=st.integers(min_value=1, max_value=12),
)
def test_framing_does_not_depend_on_how_the_input_is_cut(
    pieces: list[bytes], cuts: list[int], limit: int
) -> None:
    data = b"".join(pieces)
    bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    assert frame(chunks, limit) == reference_lines(data, limit)


async def test_frame_lines_reads_a_stream_to_its_end() -> None:
    client, server = memory_stream_pair()
    got: list[Item] = []

    async def feed() -> None:
        async with client:
            for chunk in (b"one\r\ntw", b"o\n\n", b"x" * 20, b"\nthree"):
                await client.send(chunk)

    with anyio.fail_after(10):
        async with server, anyio.create_task_group() as tg:
            tg.start_soon(feed)
            async with aclosing(frame_lines(server, limit=10)) as lines:
                got = [item async for item in lines]
    assert got == [b"one", b"two", TooLarge(10), b"three"]


# --- in-process pair ----------------------------------------------------------------------------


async def test_the_memory_pair_carries_bytes_both_ways() -> None:
    client, server = memory_stream_pair()
    async with client, server:
        await client.send(b"ping\n")
        assert await server.receive() == b"ping\n"
        await server.send(b"pong\n")
        assert await client.receive() == b"pong\n"


async def test_receive_honours_max_bytes() -> None:
    client, server = memory_stream_pair()
    async with client, server:
        await client.send(b"abcdefgh")
        assert await server.receive(3) == b"abc"
        assert await server.receive(3) == b"def"
        assert await server.receive() == b"gh"


async def test_closing_one_side_is_the_end_of_the_other() -> None:
    client, server = memory_stream_pair()
    async with server:
        await client.send(b"last")
        await client.aclose()
        assert await server.receive() == b"last"
        with pytest.raises(anyio.EndOfStream):
            await server.receive()
        with pytest.raises(anyio.BrokenResourceError):
            await server.send(b"nobody listens")


async def test_send_eof_ends_one_direction_only() -> None:
    client, server = memory_stream_pair()
    async with client, server:
        await client.send_eof()
        with pytest.raises(anyio.EndOfStream):
            await server.receive()
        await server.send(b"still open")
        assert await client.receive() == b"still open"
        with pytest.raises(anyio.ClosedResourceError):
            await client.send(b"after eof")


async def test_the_memory_pair_applies_backpressure() -> None:
    client, server = memory_stream_pair(max_buffer=2)
    async with client, server:
        await client.send(b"1")
        await client.send(b"2")
        with anyio.move_on_after(0.2) as scope:
            await client.send(b"3")
        assert scope.cancelled_caught
        assert await server.receive() == b"1"


# --- stdin / stdout in-process ------------------------------------------------------------------


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


async def test_stdio_over_a_pipe_sends_and_receives(pipe: tuple[int, int]) -> None:
    r, w = pipe
    async with StdioStream(stdin=r, stdout=w) as stream:
        await stream.send(b"hello\n")
        assert await stream.receive() == b"hello\n"
        os.close(w)
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()


async def test_stdio_receive_can_be_cancelled_and_resumed(pipe: tuple[int, int]) -> None:
    r, w = pipe
    async with StdioStream(stdin=r, stdout=w) as stream:
        with anyio.fail_after(5), anyio.move_on_after(0.1) as scope:
            await stream.receive()
        assert scope.cancelled_caught
        os.write(w, b"later")
        with anyio.fail_after(5):
            assert await stream.receive() == b"later"


async def test_closing_the_stdio_stream_wakes_a_waiting_receive(pipe: tuple[int, int]) -> None:
    r, w = pipe
    stream = StdioStream(stdin=r, stdout=w)
    outcome: list[type[BaseException]] = []

    async def wait() -> None:
        try:
            await stream.receive()
        except anyio.ClosedResourceError as exc:
            outcome.append(type(exc))

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            await stream.aclose()
    assert outcome == [anyio.ClosedResourceError]
    with pytest.raises(anyio.ClosedResourceError):
        await stream.receive()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.send(b"x")


async def test_a_large_send_to_a_slow_pipe_does_not_block_the_loop(pipe: tuple[int, int]) -> None:
    r, w = pipe
    payload = os.urandom(3 << 20)
    received = bytearray()

    async def drain() -> None:
        while len(received) < len(payload):
            await anyio.sleep(0.001)  # a slow reader: the pipe is full most of the time
            await anyio.wait_readable(r)
            received.extend(os.read(r, 1 << 16))

    with anyio.fail_after(60):
        async with StdioStream(stdin=r, stdout=w) as stream, anyio.create_task_group() as tg:
            tg.start_soon(drain)
            await stream.send(payload)
    assert bytes(received) == payload


async def test_sending_to_a_closed_reader_is_a_broken_stream(pipe: tuple[int, int]) -> None:
    r, w = pipe
    async with StdioStream(stdin=r, stdout=w) as stream:
        os.close(r)
        with pytest.raises(anyio.BrokenResourceError):
            await stream.send(b"x" * 10)


async def test_stdio_reads_and_writes_regular_files(tmp_path: Path) -> None:
    data = b"".join(b"line %d\n" % i for i in range(50_000))
    source, sink = tmp_path / "in", tmp_path / "out"
    source.write_bytes(data)
    fd_in = os.open(source, os.O_RDONLY)
    fd_out = os.open(sink, os.O_WRONLY | os.O_CREAT)
    try:
        async with StdioStream(stdin=fd_in, stdout=fd_out) as stream:
            async with aclosing(frame_lines(stream)) as lines:
                async for line in lines:
                    assert isinstance(line, bytes)
                    await stream.send(line.upper() + b"\n")
    finally:
        os.close(fd_in)
        os.close(fd_out)
    assert sink.read_bytes() == data.upper()


async def test_a_closed_stdin_is_an_empty_input() -> None:
    not_open = 1_000_000
    async with StdioStream(stdin=not_open, stdout=1) as stream:
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()


async def test_send_eof_refuses_further_sends(pipe: tuple[int, int]) -> None:
    r, w = pipe
    async with StdioStream(stdin=r, stdout=w) as stream:
        await stream.send_eof()
        with pytest.raises(anyio.ClosedResourceError):
            await stream.send(b"x")


# --- stdin / stdout through a real process ------------------------------------------------------

ECHO = """
import signal, sys
import anyio
from adapters.transports import StdioStream, TooLarge, frame_lines

async def main() -> None:
    async with StdioStream() as stream, anyio.create_task_group() as tg:
        async def stop_on_sigterm() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
        tg.start_soon(stop_on_sigterm)
        async for line in frame_lines(stream, limit=int(sys.argv[1])):
            await stream.send(b"TOO_LARGE\\n" if isinstance(line, TooLarge) else line + b"\\n")
        tg.cancel_scope.cancel()
    sys.stderr.write("clean exit\\n")

anyio.run(main, backend="asyncio")
"""
LIMIT = 1000


def echo_command() -> list[str]:
    return [sys.executable, "-c", ECHO, str(LIMIT)]


def echo_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def expected_echo(data: bytes) -> bytes:
    lines = reference_lines(data, LIMIT)
    return b"".join(b"TOO_LARGE\n" if isinstance(x, TooLarge) else x + b"\n" for x in lines)


def sample_input() -> bytes:
    lines = [b'{"id":"m-%d","type":"verify"}' % i for i in range(100_000)]
    lines[10] = b"x" * (LIMIT * 30)
    lines[20] = b"   "
    lines[30] = b'{"id":"crlf"}\r'
    return b"\n".join(lines) + b"\n" + b'{"id":"no newline at the end"}'


def test_stdio_echoes_a_pipe() -> None:
    data = sample_input()
    done = subprocess.run(
        echo_command(), input=data, capture_output=True, env=echo_env(), timeout=60, check=True
    )
    assert done.stdout == expected_echo(data)
    assert done.stderr == b"clean exit\n"


def test_stdio_echoes_a_regular_file_into_a_regular_file(tmp_path: Path) -> None:
    data = sample_input()
    (tmp_path / "in").write_bytes(data)
    with (tmp_path / "in").open("rb") as source, (tmp_path / "out").open("wb") as sink:
        subprocess.run(
            echo_command(), stdin=source, stdout=sink, env=echo_env(), timeout=60, check=True
        )
    assert (tmp_path / "out").read_bytes() == expected_echo(data)


def test_stdio_with_dev_null_everywhere_ends_at_once() -> None:
    done = subprocess.run(
        echo_command(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=echo_env(),
        timeout=60,
        check=True,
    )
    assert done.stderr == b"clean exit\n"


def read_line_within(stream: int, seconds: float) -> bytes:
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, "no reply in time"
    return os.read(stream, 1 << 16)


def assert_sigterm_exits_promptly(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - the bug this test exists for
        proc.kill()
        proc.wait()
        pytest.fail("the process did not exit after SIGTERM while stdin was open and idle")
    assert proc.returncode == 0
    assert proc.stderr is not None and proc.stderr.read() == b"clean exit\n"


def test_sigterm_stops_the_reader_while_a_stdin_pipe_stays_open() -> None:
    with subprocess.Popen(
        echo_command(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=echo_env(),
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b'{"id":"m-1"}\n')
        proc.stdin.flush()
        assert read_line_within(proc.stdout.fileno(), 30) == b'{"id":"m-1"}\n'
        assert_sigterm_exits_promptly(proc)


def test_stdio_reads_a_tty_and_sigterm_stops_it_while_idle() -> None:
    master, slave = pty.openpty()
    try:
        with subprocess.Popen(
            echo_command(),
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=echo_env(),
        ) as proc:
            assert proc.stdout is not None
            os.write(master, b"typed by hand\n")
            assert read_line_within(proc.stdout.fileno(), 30) == b"typed by hand\n"
            assert_sigterm_exits_promptly(proc)
    finally:
        os.close(master)
        os.close(slave)


# --- Unix socket --------------------------------------------------------------------------------


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are short: a fresh directory straight under the temp root.
    path = Path(tempfile.mkdtemp(prefix="bl"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def echo_handler(stream: anyio.abc.SocketStream) -> None:
    async with stream, aclosing(frame_lines(stream)) as lines:
        async for line in lines:
            await stream.send(b"TOO_LARGE\n" if isinstance(line, TooLarge) else line + b"\n")


async def ask(path: Path, lines: list[bytes]) -> bytes:
    async with await anyio.connect_unix(path) as client:
        await client.send(b"".join(line + b"\n" for line in lines))
        await client.send_eof()
        reply = bytearray()
        while True:
            try:
                reply += await client.receive()
            except anyio.EndOfStream:
                return bytes(reply)


async def test_the_socket_is_created_mode_0600_and_serves_clients(sock_dir: Path) -> None:
    path = sock_dir / "s"
    umask = os.umask(0o022)
    os.umask(umask)
    with anyio.fail_after(20):
        async with await bind_unix(str(path)) as listener:
            mode = path.lstat().st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            assert os.umask(umask) == umask  # the process umask is left as it was
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, echo_handler)
                replies: dict[int, bytes] = {}

                async def client(n: int) -> None:
                    replies[n] = await ask(path, [b"%d-%d" % (n, i) for i in range(200)])

                async with anyio.create_task_group() as clients:
                    for n in range(5):
                        clients.start_soon(client, n)
                tg.cancel_scope.cancel()
    for n in range(5):
        assert replies[n] == b"".join(b"%d-%d\n" % (n, i) for i in range(200))
    assert not path.exists()


def leave_stale_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    assert stat.S_ISSOCK(path.lstat().st_mode)


async def test_a_stale_socket_left_by_a_crash_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "s"
    leave_stale_socket(path)
    with anyio.fail_after(20):
        async with await bind_unix(str(path)) as listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo_handler)
            assert await ask(path, [b"alive"]) == b"alive\n"
            tg.cancel_scope.cancel()


async def test_a_live_socket_is_refused_and_left_alone(sock_dir: Path) -> None:
    path = sock_dir / "s"
    with anyio.fail_after(20):
        async with await bind_unix(str(path)) as first, anyio.create_task_group() as tg:
            tg.start_soon(first.serve, echo_handler)
            with pytest.raises(SocketInUse):
                await bind_unix(str(path))
            assert await ask(path, [b"first still serves"]) == b"first still serves\n"
            tg.cancel_scope.cancel()


async def test_a_live_socket_with_a_full_backlog_is_still_refused(sock_dir: Path) -> None:
    path = sock_dir / "s"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(path))
    busy.listen(0)
    waiting: list[socket.socket] = []
    try:
        while True:  # fill the backlog until a connect would block
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            waiting.append(client)
            try:
                client.connect(str(path))
            except BlockingIOError:
                break
        with pytest.raises(SocketInUse):
            await bind_unix(str(path))
    finally:
        for client in waiting:
            client.close()
        busy.close()
    assert path.exists()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink", "dangling symlink"])
async def test_a_path_that_is_not_a_socket_is_never_replaced(sock_dir: Path, kind: str) -> None:
    path = sock_dir / "s"
    target = sock_dir / "target"
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        leave_stale_socket(target)
        path.symlink_to(target)
    else:
        path.symlink_to(sock_dir / "nowhere")
    with pytest.raises(SocketPathError, match="not a socket"):
        await bind_unix(str(path))
    assert path.is_symlink() if "symlink" in kind else path.exists()
    if kind == "file":
        assert path.read_text() == "precious"


async def test_the_socket_file_goes_when_the_listener_closes(sock_dir: Path) -> None:
    path = sock_dir / "s"
    listener = await bind_unix(str(path))
    assert listener.path == str(path)
    assert path.exists()
    await listener.aclose()
    assert not path.exists()
    await listener.aclose()  # closing twice is harmless


async def test_closing_leaves_a_socket_that_replaced_ours(sock_dir: Path) -> None:
    path = sock_dir / "s"
    old = await bind_unix(str(path))
    path.unlink()  # an operator removed it and another worker bound the path since
    async with await bind_unix(str(path)):
        await old.aclose()
        assert path.exists()
    assert not path.exists()


async def test_a_path_too_long_for_af_unix_is_a_clear_error(sock_dir: Path) -> None:
    path = sock_dir / ("x" * 120)
    with pytest.raises(SocketPathError, match="at most 107"):
        await bind_unix(str(path))
    assert not path.exists()
