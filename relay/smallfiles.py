"""Small files: extracted by their server's thread with the run's helper process (relay.inflater),
which inflates batches of them on another core while the thread places what came back."""

import collections
import os
import time

from . import codecs, durable, engine
from .faults import crashpoint
from .inflater import Job
from .ledger import incoming_path
from .records import COPIED

# Files in one message to the helper process (its cost is per message), and the messages one thread
# keeps there at once, so that the helper always has work while the thread places what came back.
HELPER_BATCH = 32
HELPER_DEPTH = 2


def extract_small(run, records):
    """Extract small files: batches are inflated by the run's helper process while this thread
    places what came back, or does a batch itself when the helper has enough."""
    todo, helper = collections.deque(records), run.inflater
    sent: collections.deque[tuple] = collections.deque()  # (records taken, future)
    try:
        while todo or sent:
            if sent and (sent[0][1].done() or not todo):
                _place_batch(run, *sent.popleft())
            elif helper is not None and len(sent) < HELPER_DEPTH and len(todo) >= HELPER_BATCH:
                batch = [todo.popleft() for _ in range(HELPER_BATCH)]
                handed = _hand_over(run, helper, batch)
                if handed is None:  # no helper (any more): this thread does the rest
                    helper = None
                    todo.extendleft(reversed(batch))
                elif handed[0]:
                    sent.append(handed)
            else:  # one file here, then look again at what came back
                engine.extract_file(run, todo.popleft())
    finally:
        # Not placed (the run is stopping, or failed): free for another try. Their `.helper.part`
        # files, which the helper may still be writing, go at the next start-up sweep.
        for taken, _ in sent:
            for rec in taken:
                run.ledger.end(rec.key)


def _helper_tmp(run, rec):
    # Not the name engine.extract uses: a helper still writing a batch given up on cannot touch its file.
    return f"{run.layout.extract_tmp(rec.server)}/{rec.key}.helper.part"


def _hand_over(run, helper, batch):
    """Send those of `batch` no other thread works on to the helper: (records taken, future), or
    None if the helper is gone (then none is taken)."""
    run.check_stop()
    taken = []
    for rec in batch:
        if run.ledger.begin(rec.key):
            if rec.status == COPIED:
                taken.append(rec)
            else:
                run.ledger.end(rec.key)
    if not taken:
        return [], None
    settings = run.settings
    future = None
    try:
        future = helper.submit(
            [
                Job(
                    os.fsencode(incoming_path(settings.data_root, rec)),
                    os.fsencode(_helper_tmp(run, rec)),
                    settings.max_extracted_bytes,
                    settings.min_free_bytes,
                    *engine.expected(rec),
                )
                for rec in taken
            ]
        )
    finally:
        if future is None:  # no helper, or a failure here: the files are free again
            for rec in taken:
                run.ledger.end(rec.key)
    return None if future is None else (taken, future)


def _place_batch(run, taken, future):
    """Place what the helper made of `taken`; a file it did not do is done here, the usual way."""
    try:
        outcomes = future.result()  # None: the helper ended before answering
        if outcomes is None or len(outcomes) != len(taken):
            outcomes = [None] * len(taken)
        for rec, outcome in zip(taken, outcomes):
            run.check_stop()
            tmp = _helper_tmp(run, rec)
            if outcome is not None and outcome.done:
                run.ledger.attempt(rec, "extract")  # one that failed is counted by engine.extract, which does it again
                crashpoint("extract")
                result = codecs.Inflated(outcome.sha256, outcome.format, outcome.size)
                engine.place(run, rec, tmp, result, time.monotonic() - outcome.seconds)  # its own time, not the wait
            else:
                durable.unlink_quietly(tmp)
                with run.slot(rec.server):
                    engine.extract(run, rec)
    finally:
        for rec in taken:
            run.ledger.end(rec.key)
