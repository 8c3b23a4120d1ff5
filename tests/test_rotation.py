"""Real logrotate (numbered, delaycompress, copytruncate, dateext) against real `doit run`s: every line that
reached a compressed rotated file is extracted exactly once, renames are not transferred again, a touched
file is not extracted twice, a rewritten one is, and a hand drop never clashes with a fetched file."""

import os
import shutil

import pytest
from conftest import needs_root
from rotation import LogRotator, RelayLog, assert_settled, check_extracted, files_under
from rotation import run_ok as run

pytestmark = needs_root


def cycle(env, rot, number, lines=40):
    """Write, rotate with the real logrotate, run; the invariant must hold after the run."""
    rot.write(lines + number * 7 % 23)
    rot.rotate()
    context = f"{rot.scheme} cycle {number}: remote {[p.name for p in rot.rotated_files()]}"
    run(env, context)
    check_extracted(env.data, rot.server, rot, context)


@pytest.mark.parametrize("scheme", ["numbered", "delaycompress", "copytruncate", "dateext"])
def test_rotated_lines_extracted_exactly_once(env, tmp_path, scheme):
    rot = LogRotator(env.remote("srv1"), tmp_path / "logrotate", "srv1", scheme=scheme, keep=4)
    for number in range(1, 8):  # 7 cycles: the 4 slots fill up and the oldest files are rotated away
        cycle(env, rot, number)
    assert rot.rotations == 7 and len(rot.expected()) > 0
    assert_settled(env, {"srv1": [rot]}, f"{scheme}, at the end")


def test_twenty_full_slots_one_more_rotation_moves_only_the_new_file(env, tmp_path):
    rot = LogRotator(env.remote("srv1"), tmp_path / "logrotate", "srv1", scheme="numbered", keep=20)
    for number in range(1, 23):  # 22 rotations: all 20 slots full, two files already rotated away
        rot.write(30 + number % 5)
        rot.rotate()
        if number % 4 == 0 or number > 20:  # runs now and then, as a timer would
            run(env, f"rotation {number}")
            check_extracted(env.data, "srv1", rot, f"rotation {number}")
    assert len(rot.rotated_files()) == 20
    before = files_under(env.data / "processed" / "srv1")
    rot.write(50)
    rot.rotate()
    new = env.remote("srv1") / "app.log.1.gz"
    log = RelayLog(env.work / "logs").mark()
    run(env, "the 23rd rotation")
    check_extracted(env.data, "srv1", rot, "the 23rd rotation")
    # What rsync moved: the `fetch` lines of this run say the size of every file delivered.
    fetches = log.fetches()
    assert log.fetched_bytes() == new.stat().st_size, (
        f"19 renames and one new file ({new.stat().st_size} bytes); the run fetched {fetches}"
    )
    after = files_under(env.data / "processed" / "srv1")
    added = sorted(name for name, data in after.items() if data not in set(before.values()))
    assert [after[name] for name in added] == [new.read_bytes()], f"new content under processed/: {added}"
    assert_settled(env, {"srv1": [rot]}, "at the end")


def test_a_touched_file_is_not_extracted_again(env, tmp_path):
    rot = LogRotator(env.remote("srv1"), tmp_path / "logrotate", "srv1", keep=4)
    cycle(env, rot, 1)
    extracted = files_under(env.data / "extracted" / "srv1")
    touched = env.remote("srv1") / "app.log.1.gz"
    stat = touched.stat()
    os.utime(touched, (stat.st_atime, stat.st_mtime - 3600))  # same content, an hour older (not in the future: "young")
    run(env, "after the touch")
    check_extracted(env.data, "srv1", rot, "after the touch")
    assert files_under(env.data / "extracted" / "srv1") == extracted
    assert_settled(env, {"srv1": [rot]}, "at the end")


def test_content_rewritten_under_the_same_name(env, tmp_path):
    """The new content is extracted too, under a name of its own that says which version."""
    # `rotate 1`: each rotation replaces app.log.1.gz by a new file with new content, same name.
    rot = LogRotator(env.remote("srv1"), tmp_path / "logrotate", "srv1", keep=1)
    cycle(env, rot, 1)
    old_lines = set(rot.expected())
    [old_file] = files_under(env.data / "extracted" / "srv1")
    new_lines = set(rot.write(60))
    rot.rotate()
    assert [p.name for p in rot.rotated_files()] == ["app.log.1.gz"]
    run(env, "after the rewrite")
    check_extracted(env.data, "srv1", rot, "after the rewrite")  # old and new lines, each exactly once
    holders = {
        name
        for name, data in files_under(env.data / "extracted" / "srv1").items()
        if new_lines & set(data.decode().splitlines())
    }
    assert len(holders) == 1 and old_file not in holders, holders
    [new_file] = holders
    assert new_file.startswith("app.log.1") and new_file != old_file, new_file  # a name that says which version
    assert not set(files_under(env.data / "extracted" / "srv1")[new_file].decode().splitlines()) & old_lines
    assert_settled(env, {"srv1": [rot]}, "at the end")


@pytest.mark.parametrize("when", ["new", "processed"])  # the remote file new in the same run, or processed before
def test_hand_drop_named_like_a_remote_file(env, tmp_path, when):
    """Processed, and so is the remote file; neither overwrites the other."""
    remote = LogRotator(env.remote("srv1"), tmp_path / "logrotate", "srv1", keep=4)
    hand_dir = tmp_path / "by-hand"
    hand_dir.mkdir()
    hand = LogRotator(hand_dir, tmp_path / "logrotate", "hand", keep=4)  # lines "hand app 000001 …"
    remote.write(50)
    remote.rotate()
    hand.write(70)
    hand.rotate()
    dropped = hand_dir / "app.log.1.gz"
    assert (env.remote("srv1") / dropped.name).read_bytes() != dropped.read_bytes()
    if when == "processed":
        run(env, "before the drop")
        check_extracted(env.data, "srv1", remote, "before the drop")
    incoming = env.data / "incoming" / "srv1"
    incoming.mkdir(parents=True, exist_ok=True)
    shutil.copy2(dropped, incoming / dropped.name)
    run(env, f"the drop, {when}")
    check_extracted(env.data, "srv1", [remote, hand], f"the drop, {when}")
    sources = set(files_under(env.data / "processed" / "srv1").values())
    assert {dropped.read_bytes(), (env.remote("srv1") / dropped.name).read_bytes()} <= sources
    assert_settled(env, {"srv1": [remote, hand]}, f"the drop, {when}, at the end")
