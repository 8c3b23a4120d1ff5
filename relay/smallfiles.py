"""Small files: extracted by their server's thread with the run's helper process (relay.inflater),
which inflates batches of them on another core while the thread places what came back."""

import collections
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
    sent: collections.deque[tuple] = collections.deque()  # (records taken, future, when sent)
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
        for taken, _, _ in sent:  # not placed (the run is stopping or failed): free for another try
            for rec in taken:
                run.ledger.end(rec.key)


def _helper_tmp(run, rec):
    # Not the name engine.extract uses: a helper still writing a batch given up on cannot touch its file.
    return f"{run.layout.extract_tmp(rec.server)}/{rec.key}.helper.part"


def _hand_over(run, helper, batch):
    """Send those of `batch` no other thread works on to the helper: (records taken, future, when),
    or None if the helper is gone (then none is taken)."""
    run.check_stop()
    taken = []
    for rec in batch:
        if run.ledger.begin(rec.key):
            if rec.status == COPIED:
                taken.append(rec)
            else:
                run.ledger.end(rec.key)
    settings = run.settings
    jobs = [
        Job(
            incoming_path(settings.data_root, rec),
            _helper_tmp(run, rec),
            settings.max_extracted_bytes,
            settings.min_free_bytes,
            *engine.expected(rec),
        )
        for rec in taken
    ]
    if not jobs:
        return [], None, 0.0
    future = helper.submit(jobs)
    if future is None:
        for rec in taken:
            run.ledger.end(rec.key)
        return None
    return taken, future, time.monotonic()


def _place_batch(run, taken, future, started):
    """Place what the helper made of `taken`; a file it did not do is done here, the usual way."""
    outcomes = future.result() or [None] * len(taken)  # None: the helper ended before answering
    try:
        for rec, outcome in zip(taken, outcomes):
            run.check_stop()
            tmp = _helper_tmp(run, rec)
            if outcome is not None and outcome.done:
                run.ledger.attempt(rec, "extract")  # one that failed is counted by engine.extract, which does it again
                crashpoint("extract")
                engine.place(run, rec, tmp, codecs.Inflated(outcome.sha256, outcome.format, outcome.size), started)
            else:
                durable.unlink_quietly(tmp)
                with run.slot(rec.server):
                    engine.extract(run, rec)
    finally:
        for rec in taken:
            run.ledger.end(rec.key)
