"""No accepted item is lost: SQLite across a kill -9 of the service, Redis (AOF) across a Redis restart.
Also the ``comfyserve queue`` command line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from queue_service.client import QueueClient, QueueClientError
from standard.ports import free_port
from support.processes import wait_for_port
from support.queue import TOKEN, service_command


def start_service(args: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(service_command("--port", str(port), "--token", TOKEN, "--pending-timeout", "1.0",
                                            *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    wait_for_port(port, proc=proc)
    return proc, port


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


async def put_until_stopped(queue: QueueClient, acked: list[int], stop_after: int, retries: int = 0) -> None:
    """Put items one after another, remembering what the service acknowledged."""
    n = failures = 0
    while n < stop_after:
        try:
            index, _ = await queue.put(f"item-{n}")
        except QueueClientError:
            failures += 1
            if failures > retries:
                return
            await asyncio.sleep(0.1)
            continue
        acked.append(index)
        n += 1


async def test_sqlite_keeps_every_acknowledged_item_across_kill_9(tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'q.sqlite3'}"
    proc, port = start_service(["--store", store])
    acked: list[int] = []
    try:
        async with QueueClient(f"127.0.0.1:{port}", "svc", token=TOKEN, uid="w1") as queue:
            producers = [asyncio.create_task(put_until_stopped(queue, acked, 10_000)) for _ in range(4)]
            while len(acked) < 150:
                await asyncio.sleep(0.01)
            # A watcher holds two items, uncommitted, when the service dies.
            watcher = queue.watch(window=2)
            held = [await asyncio.wait_for(watcher.__anext__(), 5) for _ in range(2)]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            await asyncio.gather(*producers)
            await watcher.aclose()
    finally:
        stop(proc)
    proc, port = start_service(["--store", store])
    try:
        async with QueueClient(f"127.0.0.1:{port}", "svc", token=TOKEN) as queue:
            frames = await queue.get(length=1000)
            stored = {f.index for f in frames}
            assert set(acked) <= stored, sorted(set(acked) - stored)[:10]
            assert len(stored) <= len(acked) + 4  # at most the puts in flight at the kill
            # The held items come back to another consumer once their lease runs out.
            async with queue.watch(window=len(stored) + 1) as watcher:
                seen = {(await asyncio.wait_for(watcher.__anext__(), 5)).index for _ in range(len(stored))}
            assert {f.index for f in held} <= seen
            index, _ = await queue.put(b"after restart")
            assert index > max(stored)  # indexes are never reused
    finally:
        stop(proc)


async def test_redis_keeps_every_acknowledged_item_across_a_redis_restart(redis_server, redis_url: str) -> None:
    proc, port = start_service(["--redis-url", redis_url])
    acked: list[int] = []
    try:
        async with QueueClient(f"127.0.0.1:{port}", "svc", token=TOKEN) as queue:
            received: list[int] = []

            async def consume() -> None:
                async with queue.watch(window=5) as watcher:
                    async for frame in watcher:
                        received.append(frame.index)
                        while True:
                            try:
                                await queue.commit(frame.index)
                                break
                            except QueueClientError:
                                await asyncio.sleep(0.1)

            consumer = asyncio.create_task(consume())
            await put_until_stopped(queue, acked, 30)
            await asyncio.to_thread(redis_server.restart)  # the service sees Redis vanish and return
            # The service answers 503 while Redis is away and recovers on its own.
            for _ in range(50):
                try:
                    await queue.attributes()
                    break
                except QueueClientError as exc:
                    assert exc.status in (0, 503)
                    await asyncio.sleep(0.1)
            await put_until_stopped(queue, acked, 30, retries=20)
            for _ in range(100):
                if set(acked) <= set(received):
                    break
                await asyncio.sleep(0.05)
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            assert set(acked) <= set(received)
            assert len(set(acked)) == 60
    finally:
        stop(proc)


def test_cli_help_lists_every_flag_with_its_environment_variable(cli_env: dict[str, str]) -> None:
    out = subprocess.run(["comfyserve", "queue", "--help"], capture_output=True, text=True, env=cli_env,
                         timeout=30)
    assert out.returncode == 0
    for flag in ("--data-dir", "--store", "--redis-url", "--listen", "--no-auth", "--port", "--token",
                 "--max-length", "--max-payload", "--pending-timeout", "--redis-call-timeout"):
        assert flag in out.stdout
        assert "COMFYSERVE_" + flag[2:].replace("-", "_").upper() in out.stdout


def test_cli_refuses_a_public_address_without_a_token(cli_env: dict[str, str], tmp_path: Path) -> None:
    out = subprocess.run(service_command("--data-dir", str(tmp_path), "--listen"), capture_output=True, text=True,
                         env=cli_env, timeout=30)
    assert out.returncode == 2 and "without a token" in out.stderr
    out = subprocess.run(service_command("--data-dir", str(tmp_path), "--host", "0.0.0.0", "--token", " "),
                         capture_output=True, text=True, env=cli_env, timeout=30)
    assert out.returncode == 2 and "must not be empty" in out.stderr


def test_cli_refuses_a_missing_or_bad_store(cli_env: dict[str, str]) -> None:
    out = subprocess.run(service_command(), capture_output=True, text=True, env=cli_env, timeout=30)
    assert out.returncode == 2 and "--data-dir" in out.stderr
    out = subprocess.run(service_command("--store", "mysql:x"), capture_output=True, text=True, env=cli_env,
                         timeout=30)
    assert out.returncode == 2 and "sqlite:PATH" in out.stderr
    out = subprocess.run(service_command("--redis-url", "redis://127.0.0.1:1/0", "--redis-call-timeout", "0"),
                         capture_output=True, text=True, env=cli_env, timeout=30)
    assert out.returncode == 2 and "--redis-call-timeout must be positive" in out.stderr


def test_a_second_process_on_the_same_sqlite_store_is_refused(tmp_path: Path, cli_env: dict[str, str]) -> None:
    store = f"sqlite:{tmp_path / 'q.sqlite3'}"
    proc, _ = start_service(["--store", store])
    try:
        out = subprocess.run(service_command("--store", store, "--port", str(free_port())), capture_output=True,
                             text=True, env=cli_env, timeout=30)
        assert out.returncode == 2 and "in use by another queue-service process" in out.stderr
    finally:
        stop(proc)


def test_cli_reads_the_environment_and_uses_the_data_dir(tmp_path: Path, cli_env: dict[str, str]) -> None:
    env = {**cli_env, "COMFYSERVE_DATA_DIR": str(tmp_path / "data"), "COMFYSERVE_MAX_LENGTH": "1"}
    proc, port = start_service([], env=env)
    try:
        async def scenario() -> None:
            async with QueueClient(f"127.0.0.1:{port}", "svc", token=TOKEN) as queue:
                await queue.put(b"one")
                try:
                    await queue.put(b"two")
                except QueueClientError as exc:
                    assert exc.status == 429
                else:
                    raise AssertionError("max length from the environment was not applied")

        asyncio.run(scenario())
        assert (tmp_path / "data" / "queue" / "queue.sqlite3").exists()
    finally:
        stop(proc)
    assert os.path.exists(tmp_path / "data")


async def test_sigterm_gives_pending_items_back_for_the_next_process(tmp_path: Path) -> None:
    store = f"sqlite:{tmp_path / 'q.sqlite3'}"
    proc, port = start_service(["--store", store, "--pending-timeout", "120"])
    try:
        async with QueueClient(f"127.0.0.1:{port}", "svc", token=TOKEN) as queue:
            for n in range(3):
                await queue.put(str(n))
            watcher = queue.watch(window=3)
            held = [await asyncio.wait_for(watcher.__anext__(), 5) for _ in range(3)]
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 15) == 0
            watcher._closed = True  # this client stays away
    finally:
        stop(proc)
    proc, port = start_service(["--store", store, "--pending-timeout", "120"])
    try:
        async with QueueClient(f"127.0.0.1:{port}", "svc", token=TOKEN) as queue:
            async with queue.watch(window=3) as watcher:
                again = [await asyncio.wait_for(watcher.__anext__(), 5) for _ in range(3)]
        assert [f.index for f in again] == [f.index for f in held]  # not after a 120 s lease
    finally:
        stop(proc)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_service_runs_on_either_event_loop(tmp_path: Path, loop: str) -> None:
    port = free_port()
    command = [sys.executable, "-m", "standard.cli", "--log-level", "DEBUG", "--loop", loop, "queue",
               "--data-dir", str(tmp_path), "--port", str(port), "--token", TOKEN]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc)

        async def scenario() -> None:
            async with QueueClient(f"127.0.0.1:{port}", "svc", token=TOKEN) as queue:
                index, _ = await queue.put(b"one")
                async with queue.watch(window=1, auto_commit=True) as frames:
                    frame = await asyncio.wait_for(frames.__anext__(), 5)
                assert (frame.index, frame.data) == (index, b"one")

        asyncio.run(scenario())
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert f"event loop: {loop}" in err.decode()


def test_an_unknown_event_loop_is_refused(cli_env: dict[str, str]) -> None:
    out = subprocess.run(["comfyserve", "--loop", "trio", "queue"], capture_output=True, text=True, env=cli_env,
                         timeout=30)
    assert out.returncode == 2 and "invalid choice: 'trio'" in out.stderr
    out = subprocess.run(["comfyserve", "queue"], capture_output=True, text=True,
                         env={**cli_env, "COMFYSERVE_LOOP": "trio"}, timeout=30)
    assert out.returncode == 2 and "COMFYSERVE_LOOP='trio': invalid choice" in out.stderr


def test_the_event_loop_choice_does_not_outlive_an_in_process_run(tmp_path: Path) -> None:
    from standard.cli import main

    before = asyncio.get_event_loop_policy()
    assert main(["--loop", "uvloop", "queue", "--store", "mysql:x"]) == 2  # refused: returns at once
    assert asyncio.get_event_loop_policy() is before
