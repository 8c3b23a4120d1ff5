"""Pure logic in-process: argument lists, listing parser, error classification, retry schedule, codec, planning."""

import errno
import gzip
import hashlib
import logging
import os
import random
import subprocess
import threading
import types

import pytest

from relay import codecs, fetching, remote, retry
from relay.config import Server, Settings
from relay.errors import ArchiveError, AuthFailed, CorruptArchive, HostKeyMismatch, RemoteFileMissing, RemoteUnreachable


def settings(**over):
    values = dict(
        config_dir="/c",
        data_root="/d/data",
        state_dir="/d/state",
        log_dir="/d/logs",
        tmp_dir="/d/tmp",
        max_retry_copy=3,
        max_retry_extract=3,
        retry_delay_base=1.0,
        retry_delay_max=8.0,
        log_format="json",
        log_level="INFO",
        ssh_known_hosts="/k/known hosts",
        ssh_identity_file=None,
        ssh_strict_host_key_checking="yes",
        ssh_connect_timeout=10,
        ssh_server_alive_interval=15,
        ssh_server_alive_count_max=3,
        ssh_deadline=3600,
        ssh_control_persist=60,
        servers=(),
        delete_source=False,
        process_incoming=True,
        max_workers=2,
        max_per_server=2,
        min_file_age_seconds=60,
        max_extracted_bytes=10**9,
        min_free_bytes=0,
    )
    values.update(over)
    return Settings(**values)


KEY_SERVER = Server(name="srv1", host="h1", user="u", remote_paths=("/var/log/*.gz",))
PASS_SERVER = Server(name="srv2", host="h2", user="u", remote_paths=("/x/*.gz",), auth="password", port=2222)


# --- rsync / ssh argument lists -------------------------------------------------------------


def test_rsync_flags_are_hardened():
    argv = remote.rsync_argv(settings(), KEY_SERVER, "/sock", "/var/log", "/stage")
    assert argv[0] == "rsync"
    for flag in ("--protect-args", "--times", "--no-relative", "--from0", "--files-from=-"):
        assert flag in argv
    for forbidden in ("-a", "-l", "-p", "-o", "-g", "-z", "-R", "--delete", "--archive", "--links"):
        assert forbidden not in argv
    assert argv[-3] == "--" and argv[-2] == "h1:/var/log/" and argv[-1] == "/stage/"
    ssh = argv[argv.index("-e") + 1]
    assert "StrictHostKeyChecking=yes" in ssh and "'UserKnownHostsFile=/k/known hosts'" in ssh
    assert "ConnectTimeout=10" in ssh and "ServerAliveInterval=15" in ssh and "ControlPath=/sock/" in ssh
    assert "BatchMode=yes" in ssh


def test_rsync_trusts_the_sender_unless_the_local_rsync_lacks_the_option(monkeypatch):
    # rsync's own check of the sender's names is quadratic in their number; the batch's private
    # landing directory and relay.fetching's taking only the names asked for stand in for it.
    assert remote.rsync_argv(settings(), KEY_SERVER, "/sock", "/x", "/s")[1] == "--trust-sender"
    assert "--trust-sender" not in remote.rsync_argv(settings(), KEY_SERVER, "/sock", "/x", "/s", trust_sender=False)
    old = "rsync: --trust-sender: unknown option\nrsync error: syntax or usage error (code 1) at main.c(1795)\n"
    assert remote.refuses_trust_sender(old)
    assert not remote.refuses_trust_sender('rsync: link_stat "/x/a.gz" failed: No such file or directory (2)')
    calls = []

    def fake_run(server, argv, **kw):  # an rsync before 3.2.5: refuses the option, then works without it
        calls.append(argv)
        return (1, b"", old) if "--trust-sender" in argv else (0, b"", "")

    monkeypatch.setattr(remote, "_run", fake_run)
    conn = remote.Connection(settings(), KEY_SERVER)
    conn._open = True
    conn.fetch("/x", ["a.gz"], "/s")
    assert ["--trust-sender" in argv for argv in calls] == [True, False]
    conn.fetch("/x", ["b.gz"], "/s")  # remembered: no second refusal
    assert ["--trust-sender" in argv for argv in calls] == [True, False, False]


def test_command_output_is_read_whole_or_line_by_line_across_reads():
    read_end, write_end = os.pipe()
    os.write(write_end, b"a.gz\nb")  # a line split between two reads
    os.write(write_end, b"\\#303\\#251.gz\nlast-without-newline")
    os.close(write_end)
    lines = []
    remote._read_lines(read_end, lines.append)
    os.close(read_end)
    assert lines == ["a.gz", "b\\#303\\#251.gz", "last-without-newline"]
    assert [remote.decode_rsync_name(line) for line in lines[:2]] == ["a.gz", "bé.gz"]
    read_end, write_end = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write_end, b"x" * 200_000), os.close(write_end)))
    writer.start()  # more than a pipe holds: several reads
    assert remote._read_all(read_end) == b"x" * 200_000
    writer.join()
    os.close(read_end)


def test_a_batch_landing_directory_is_removed_and_unasked_files_are_said(tmp_path, monkeypatch):
    staging = tmp_path / "batch-x"
    staging.mkdir()
    (staging / "asked.gz").write_bytes(b"1")  # asked for but not taken (the batch failed)
    (staging / ".asked.gz.Ab12Cd").write_bytes(b"2")  # rsync's temp file of an interrupted transfer
    (staging / "extra.gz").write_bytes(b"3")  # nobody asked for it
    (staging / "sub").mkdir()
    (staging / "sub" / "deeper.gz").write_bytes(b"4")
    said = []
    monkeypatch.setattr(
        fetching.logs, "note", lambda logger, level, message, fields: said.append((level, message, fields))
    )
    fetching._clear_staging(types.SimpleNamespace(log=None), "srv1", str(staging), {"asked.gz"})
    assert not staging.exists()
    assert said == [
        (
            logging.WARNING,
            "the server sent 2 file(s) that were not asked for (extra.gz, sub); removed, not processed",
            {"server": "srv1", "operation": "fetch"},
        )
    ]


def test_password_goes_through_sshpass_env_only():
    argv = remote.master_argv(settings(), PASS_SERVER, "/sock")
    assert argv[:3] == ["sshpass", "-e", "ssh"]
    assert "-p" not in argv[:3] and "2222" in argv
    assert "BatchMode=yes" not in argv
    rsync = remote.rsync_argv(settings(), PASS_SERVER, "/sock", "/x", "/s")
    assert rsync[rsync.index("-e") + 1].startswith("sshpass -e ssh ")


def test_password_env_is_required_and_never_in_argv(monkeypatch):
    monkeypatch.delenv("SSH_PASSWORD", raising=False)
    with pytest.raises(AuthFailed, match=r"\$SSH_PASSWORD is not set"):
        remote._env_for(PASS_SERVER)
    monkeypatch.setenv("SSH_PASSWORD", "s3cret")
    assert remote._env_for(PASS_SERVER)["SSHPASS"] == "s3cret"
    assert "SSHPASS" not in remote._env_for(KEY_SERVER)
    assert all("s3cret" not in a for a in remote.master_argv(settings(), PASS_SERVER, "/sock"))


def test_accept_new_and_identity_file():
    opts = remote.ssh_options(
        settings(ssh_strict_host_key_checking="accept-new", ssh_identity_file="/id"), KEY_SERVER, "/sock"
    )
    assert "StrictHostKeyChecking=accept-new" in opts and opts[opts.index("-i") + 1] == "/id"


def test_control_dir_is_short_enough_for_a_socket():
    assert remote.control_dir("/d/state") == "/d/state/ssh"
    long_dir = remote.control_dir("/" + "x" * 120)
    assert len(long_dir) < 60


def test_split_glob():
    assert remote.split_glob("/var/log/apps/*.gz") == ("/var/log/apps", 1)
    assert remote.split_glob("/var/log/*/app-?.gz") == ("/var/log", 2)
    assert remote.split_glob("/srv/exact.gz") == ("/srv", 1)


def test_listing_script_runs_and_keeps_odd_names(tmp_path):
    names = [
        b"plain.gz",
        b"with space.gz",
        b"-dash.gz",
        b"q'uo\"te.gz",
        b"$(touch pwned).gz",
        b"new\nline.gz",
        b"latin-\xe9.gz",
    ]
    for name in names:
        (tmp_path / os.fsdecode(name)).write_bytes(b"x")
    (tmp_path / "dir.gz").mkdir()
    os.symlink(tmp_path / "plain.gz", tmp_path / "link.gz")
    (tmp_path / "other.txt").write_bytes(b"x")
    script = remote.listing_script([str(tmp_path / "*.gz")])
    out = subprocess.run(["sh", "-c", script], capture_output=True, check=True).stdout
    entries = {os.path.basename(os.fsencode(e.path)): e for e in remote.parse_listing(out)}
    assert set(entries) == set(names) | {b"dir.gz", b"link.gz"}
    assert entries[b"dir.gz"].kind == "d" and entries[b"link.gz"].kind == "l"
    assert entries[b"new\nline.gz"].kind == "f" and entries[b"plain.gz"].size == 1
    assert not (tmp_path / "pwned").exists()


def test_exact_path_escaping_matches_only_itself(tmp_path):
    (tmp_path / "a[1]*.gz").write_bytes(b"x")
    (tmp_path / "a1-.gz").write_bytes(b"x")
    script = remote.listing_script([remote.glob_escape(str(tmp_path / "a[1]*.gz"))])
    out = subprocess.run(["sh", "-c", script], capture_output=True, check=True).stdout
    assert [os.path.basename(e.path) for e in remote.parse_listing(out)] == ["a[1]*.gz"]


def test_missing_root_lists_nothing():
    out = subprocess.run(
        ["sh", "-c", remote.listing_script(["/nonexistent-dir/*.gz"])], capture_output=True, check=True
    ).stdout
    assert out == b""


@pytest.mark.parametrize(
    "code, stderr, tool, kind",
    [
        (255, "user@h: Permission denied (publickey).", "ssh", AuthFailed),
        (5, "", "sshpass", AuthFailed),
        (12, "Permission denied, please try again.", "rsync", AuthFailed),
        (255, "Host key verification failed.", "ssh", HostKeyMismatch),
        (6, "", "sshpass", HostKeyMismatch),
        (255, "ssh: connect to host h port 22: Connection refused", "ssh", RemoteUnreachable),
        (12, "rsync: connection unexpectedly closed (0 bytes received so far) [Receiver]", "rsync", RemoteUnreachable),
        (30, "rsync error: timeout in data send/receive", "rsync", RemoteUnreachable),
        (23, 'rsync: [sender] send_files failed to open "/x/a.gz": Permission denied (13)', "rsync", RemoteFileMissing),
        (23, 'rsync: link_stat "/x/a.gz" failed: No such file or directory (2)', "rsync", RemoteFileMissing),
    ],
)
def test_classify_by_code_and_stderr(code, stderr, tool, kind):
    err = remote.classify(code, stderr, server="srv1", tool=tool)
    assert type(err) is kind
    assert err.transient == (kind is RemoteUnreachable)


# --- retry ------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_exponential_and_capped():
    assert retry.backoff_delay(1, 2.0, 100, rng=lambda: 1.0) == 2.0
    assert retry.backoff_delay(4, 2.0, 100, rng=lambda: 1.0) == 16.0
    assert retry.backoff_delay(10, 2.0, 100, rng=lambda: 1.0) == 100
    assert retry.backoff_delay(3, 2.0, 100, rng=lambda: 0.0) == 0.0
    rng = random.Random(1)
    delays = [retry.backoff_delay(3, 2.0, 100, rng=rng.random) for _ in range(200)]
    assert 0 <= min(delays) < 1 and 7 < max(delays) <= 8


def test_retry_only_transient_faults():
    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RemoteUnreachable("refused")
        return "ok"

    assert (
        retry.call_with_retry(flaky, attempts=3, base=1, cap=10, sleep=slept.append, is_transient=lambda e: e.transient)
        == "ok"
    )
    assert len(calls) == 3 and len(slept) == 2

    calls.clear()

    def denied():
        calls.append(1)
        raise AuthFailed("denied")

    with pytest.raises(AuthFailed):
        retry.call_with_retry(
            denied, attempts=5, base=1, cap=10, sleep=slept.append, is_transient=lambda e: e.transient
        )
    assert len(calls) == 1

    calls.clear()
    with pytest.raises(RemoteUnreachable):
        retry.call_with_retry(
            lambda: (calls.append(1), (_ for _ in ()).throw(RemoteUnreachable("x"))),
            attempts=4,
            base=0,
            cap=0,
            sleep=lambda s: None,
            is_transient=lambda e: e.transient,
        )
    assert len(calls) == 4


# --- codec ------------------------------------------------------------------------------------


def extract(tmp_path, blob, **kw):
    src = tmp_path / "in.gz"
    src.write_bytes(blob)
    out = tmp_path / "out.part"
    kw.setdefault("max_bytes", 10**9)
    kw.setdefault("min_free", 0)
    return codecs.inflate(str(src), str(out), **kw), out


def test_multi_member_gzip_is_extracted_whole_in_one_pass(tmp_path):
    blob = gzip.compress(b"one\n") + gzip.compress(b"two\n") + b"\0" * 16
    result, out = extract(tmp_path, blob)
    assert out.read_bytes() == b"one\ntwo\n" and result.size == 8 and result.format == "gzip"
    assert result.sha256 == hashlib.sha256(blob).hexdigest()


def test_large_output_streams_in_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(codecs, "CHUNK", 4096)
    data = os.urandom(50_000) + b"a" * 3_000_000
    result, out = extract(tmp_path, gzip.compress(data))
    assert out.read_bytes() == data and result.size == len(data)


@pytest.mark.parametrize(
    "blob",
    [
        gzip.compress(b"x" * 10000)[:-4],  # length missing
        gzip.compress(b"x" * 10000)[:20],  # truncated deflate
        gzip.compress(b"hello world")[:-8] + b"\x00\x00\x00\x00\x0b\x00\x00\x00",  # bad CRC
        gzip.compress(b"hello world") + b"garbage after the member",
        b"",
        b"BZh91AY&SY not gzip",
    ],
)
def test_corrupt_input_raises_and_leaves_no_file(tmp_path, blob):
    with pytest.raises(CorruptArchive):
        extract(tmp_path, blob)
    assert not (tmp_path / "out.part").exists()


def test_output_cap_stops_a_bomb(tmp_path):
    with pytest.raises(CorruptArchive, match="max_extracted_bytes"):
        extract(tmp_path, gzip.compress(b"\0" * 5_000_000), max_bytes=1_000_000)
    assert not (tmp_path / "out.part").exists()


def test_free_space_reserve_is_an_extract_error(tmp_path):
    with pytest.raises(ArchiveError, match="min_free_bytes"):
        extract(tmp_path, gzip.compress(b"data"), min_free=2**62)


def test_disk_full_is_retryable_extract_error(tmp_path, monkeypatch):
    real_write = os.write
    part_fds = set()
    real_open = os.open

    def tracking_open(path, flags, *a, **k):
        fd = real_open(path, flags, *a, **k)
        if str(path).endswith(".part"):
            part_fds.add(fd)
        return fd

    def full_write(fd, data):
        if fd in part_fds:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "write", full_write)
    with pytest.raises(ArchiveError, match="disk full"):
        extract(tmp_path, gzip.compress(b"data"))
    monkeypatch.undo()
    assert not (tmp_path / "out.part").exists()


def test_format_by_magic_not_suffix(tmp_path):
    assert codecs.detect_format(b"BZh91AY&SY") == ""
    assert codecs.detect_format(gzip.compress(b"x")) == "gzip"
    with pytest.raises(CorruptArchive, match="unknown format"):
        extract(tmp_path, b"BZh91AY&SY looks.gz but is not")
    assert codecs.output_name("app.log.gz", "gzip") == "app.log"
    assert codecs.output_name("app.log", "gzip") == "app.log.out"


def entry(path, size=10, mtime="1000.5", kind="f"):
    return remote.Entry(kind, size, mtime, path)


def test_control_socket_directory_must_be_ours(tmp_path):
    path = tmp_path / "sockets"
    assert remote.private_dir(str(path)) == str(path)
    assert (path.stat().st_mode & 0o777) == 0o700
    os.chown(path, 12345, 12345)
    with pytest.raises(remote.RemoteError, match="not a directory owned by this user"):
        remote.private_dir(str(path))


def test_rsync_names_are_decoded_back_to_their_bytes():
    assert remote.decode_rsync_name("access.log.1.gz\n") == "access.log.1.gz"
    assert remote.decode_rsync_name("latin1-\\#351.gz\n") == os.fsdecode(b"latin1-\xe9.gz")
    assert remote.decode_rsync_name("new\\#012line.gz\n") == "new\nline.gz"
    assert remote.decode_rsync_name("back\\slash.gz\n") == "back\\slash.gz"
