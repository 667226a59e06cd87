"""What following rotations costs a poll of the log follower (issue 17, finding 6).

    python -m benchmarks.log_follow [--rounds N]

Two cases, each against its floor, round by round (odd rounds the floor first):
- a quiet log (the usual poll): the follower's poll, now with the inotify drain that counts rotations,
  against a bare stat, fstat and two preads of the same file, open;
- 13 rotations of 150 lines between two polls (the issue's writer, logrotate's numbered renames): the
  poll that reads all of them, against reading the same 14 files whole with plain open().read().
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from mpswatch.logfollow import LogFollower

LINE = "[2026-11-29 19:23:34.372 Server   486] Client process {} disconnected\n"


def quiet_round(path: Path, fd: int, follower: LogFollower, floor_first: bool) -> tuple[float, float]:
    def floor() -> float:
        started = time.perf_counter()
        os.stat(path)
        size = os.fstat(fd).st_size
        os.pread(fd, 64, 0)
        os.pread(fd, 1 << 20, size)
        return time.perf_counter() - started

    def poll() -> float:
        started = time.perf_counter()
        follower.poll()
        return time.perf_counter() - started

    if floor_first:
        bare = floor()
        return poll(), bare
    measured = poll()
    return measured, floor()


def rotations_round(work: Path, floor_first: bool) -> tuple[float, float, int]:
    directory = Path(tempfile.mkdtemp(dir=work))
    log = directory / "server.log"
    log.write_text(LINE.format(0))
    follower = LogFollower(str(log), backfill_bytes=1 << 20)
    follower.poll()
    for rotation in range(13):
        with open(log, "a") as handle:
            handle.writelines(LINE.format(rotation * 150 + i) for i in range(150))
        for number in range(rotation, 0, -1):
            os.rename(directory / f"server.log.{number}", directory / f"server.log.{number + 1}")
        os.rename(log, directory / "server.log.1")
        log.touch()
    with open(log, "a") as handle:
        handle.writelines(LINE.format(13 * 150 + i) for i in range(150))
    files = [log, *(directory / f"server.log.{n}" for n in range(1, 14))]

    def floor() -> float:
        started = time.perf_counter()
        for path in files:
            with open(path, "rb") as handle:
                handle.read().split(b"\n")
        return time.perf_counter() - started

    bare = floor() if floor_first else None
    started = time.perf_counter()
    lines = len(follower.poll())
    measured = time.perf_counter() - started
    if bare is None:
        bare = floor()
    follower.close()
    return measured, bare, lines


def summary(values: list[float]) -> dict[str, float]:
    deciles = statistics.quantiles(values, n=10)
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200)
    rounds = parser.parse_args().rounds
    work = Path(tempfile.mkdtemp(prefix="mpswatch-logfollow-"))
    quiet_log = work / "server.log"
    quiet_log.write_text("".join(LINE.format(i) for i in range(1000)))
    follower = LogFollower(str(quiet_log), backfill_bytes=1 << 20)
    follower.poll()
    fd = os.open(quiet_log, os.O_RDONLY)
    quiet = [quiet_round(quiet_log, fd, follower, r % 2 == 1) for r in range(rounds)]
    os.close(fd)
    rotated = [rotations_round(work, r % 2 == 1) for r in range(max(rounds // 4, 10))]
    ms = 1000.0
    print(json.dumps({
        "quiet poll, ms": summary([m * ms for m, _ in quiet]),
        "quiet floor (stat, fstat, 2 preads), ms": summary([f * ms for _, f in quiet]),
        "quiet poll / floor": summary([m / f for m, f in quiet]),
        "13 rotations poll, ms": summary([m * ms for m, _, _ in rotated]),
        "13 rotations floor (14 files read whole), ms": summary([f * ms for _, f, _ in rotated]),
        "13 rotations poll / floor": summary([m / f for m, f, _ in rotated]),
        "lines read in the rotations poll": rotated[0][2],
        "rounds": [rounds, len(rotated)],
    }, indent=1))


if __name__ == "__main__":
    main()
