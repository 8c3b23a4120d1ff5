"""Pure planning: versions, renames, hand drops, leftovers (no I/O)."""

from relay.planning import Local, filed_name, plan_server
from relay.records import COPIED, ERROR, PENDING, PROCESSED, Record, version_key
from relay.remote import Entry
from relay.store import Known

NOW = 2_000_000_000.0


def entry(path, size, mtime="1700000000.0000000000"):
    return Entry("f", size, mtime, path)


def remote(path, size, mtime, status, key=None, **fields):
    """A record of server "s"'s remote file `path` (its version key unless `key` is given)."""
    return Record(
        key=key or version_key("s", "remote", path, size, mtime),
        server="s",
        origin="remote",
        remote_path=path,
        size=size,
        mtime=mtime,
        status=status,
        **fields,
    )


def processed(path, size, mtime="1700000000.0000000000", sha="a" * 64, local=None):
    rec = remote(path, size, mtime, PROCESSED, sha256=sha, local_name=local or path.rsplit("/", 1)[1])
    return rec, Known(rec.key, PROCESSED, size, mtime, sha, path)


def plan(entries, known=(), unfinished=(), incoming=(), named=None, drops=True):
    return plan_server(
        "s",
        entries=entries,
        incoming=list(incoming),
        known={k.key: k for k in known},
        unfinished=list(unfinished),
        processed_named=named or {},
        now=NOW,
        min_age=60,
        take_drops=drops,
    )


def test_a_changed_file_under_a_processed_name_is_new_work():
    _, known = processed("/l/app.log.1.gz", 100)
    p = plan([entry("/l/app.log.1.gz", 120, "1700000500.0")], [known])
    [rec] = p.due
    assert (rec.status, rec.size, rec.local_name) == (PENDING, 120, "app.log.1.gz")
    assert rec.key != known.key and p.done == 0


def test_a_touched_file_is_new_work_probed_as_a_possible_rename():
    _, known = processed("/l/app.log.1.gz", 100, sha="b" * 64)
    p = plan([entry("/l/app.log.1.gz", 100, "1700009999.0")], [known])
    [rec] = p.due
    assert p.probes == {rec.key: ["b" * 64]}


def test_numbered_rotation_new_file_fetched_renamed_one_probed():
    _, known = processed("/l/app.log.1.gz", 100, sha="c" * 64)
    p = plan([entry("/l/app.log.2.gz", 100), entry("/l/app.log.1.gz", 80, "1700086400.0")], [known])
    by_path = {r.remote_path: r for r in p.due}
    assert set(by_path) == {"/l/app.log.1.gz", "/l/app.log.2.gz"}
    assert p.probes == {by_path["/l/app.log.2.gz"].key: ["c" * 64]}


def test_the_unchanged_version_is_done():
    _, known = processed("/l/a.gz", 10)
    p = plan([entry("/l/a.gz", 10)], [known])
    assert (p.due, p.done) == ([], 1)


def test_a_hand_drop_under_a_remote_name_is_never_overwritten():
    drop = Local("app.log.1.gz", 55, "1700000000.123456789")
    p = plan([entry("/l/app.log.1.gz", 70)], incoming=[drop])
    remote = [r for r in p.due if r.origin == "remote"][0]
    local = [r for r in p.due if r.origin == "local"][0]
    assert remote.local_name.startswith("app.log.1.gz~") and remote.status == PENDING
    assert (local.local_name, local.status) == ("app.log.1.gz", COPIED)


def test_a_copy_already_in_incoming_is_not_fetched_again():
    p = plan([entry("/l/a.gz", 70, "1700000000.5")], incoming=[Local("a.gz", 70, "1700000000.000000000")])
    [rec] = p.due
    assert (rec.status, rec.local_name) == (COPIED, "a.gz")


def test_parked_version_waits_and_a_pending_one_no_longer_listed_is_superseded():
    parked = remote("/l/p.gz", 5, "1.0", ERROR, error_kind="copy")
    gone = remote("/l/gone.gz", 5, "1.0", PENDING, key="k" * 32, local_name="gone.gz")
    p = plan(
        [entry("/l/p.gz", 5, "1.0")], [Known(parked.key, ERROR, 5, "1.0", "", "/l/p.gz")], unfinished=[parked, gone]
    )
    assert p.parked == [parked] and p.superseded == [gone] and p.due == []


def test_listing_failed_keeps_pending_and_goes_on_with_local_copies():
    pending = remote("/l/x.gz", 5, "1.0", PENDING, key="p" * 32, local_name="x.gz")
    copied = remote("/l/y.gz", 7, "1.0", COPIED, key="c" * 32, local_name="y.gz")
    p = plan(None, unfinished=[pending, copied], incoming=[Local("y.gz", 7, "1.000000000")])
    assert p.due == [copied] and p.superseded == [] and not p.listed


def test_a_processed_source_left_in_incoming_is_finished_not_redone():
    rec, known = processed("/l/a.gz", 10, local="a.gz")
    p = plan(
        [entry("/l/a.gz", 10)], [known], incoming=[Local("a.gz", 10, "1700000000.000000000")], named={"a.gz": [rec]}
    )
    assert p.finish == [rec] and p.due == []


def test_drops_are_left_alone_when_switched_off():
    p = plan([], incoming=[Local("d.gz", 3, "1.0")], drops=False)
    assert p.due == []


def test_young_files_wait():
    p = plan([entry("/l/new.gz", 3, f"{NOW - 5}")])
    assert p.due == [] and p.skipped[0].reason.startswith("younger")


def test_filed_name_tags_a_taken_name_with_the_content():
    assert filed_name("a.log.1.gz", "0123456789abcdef" * 4, lambda n: False) == "a.log.1.gz"
    assert filed_name("a.log.1.gz", "0123456789abcdef" * 4, lambda n: n == "a.log.1.gz") == "a.log.1.0123456789ab.gz"
    assert filed_name("plain", "0123456789abcdef" * 4, lambda n: n == "plain") == "plain.0123456789ab"
