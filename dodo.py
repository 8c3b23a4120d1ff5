"""logpipe-relay task graph: `doit run`, `doit run extract:SERVER`, `doit forget -s recover:… && doit run`.

Importing it reads the configuration and the state store, nothing else: no SSH, no lock, no write."""

from relay import tasks

RUN = tasks.build()
KNOWN = tasks.Known(RUN)
DOIT_CONFIG = tasks.doit_config(RUN)


def task_plan():
    """List a server (one SSH round trip) and plan its work."""
    yield from tasks.plan_tasks(RUN)


def task_fetch():
    """Fetch a server's due files with rsync over ssh, in one batch."""
    yield from tasks.fetch_tasks(RUN)


def task_extract():
    """Verify, extract and file due files; `extract:SERVER` is everything for one server."""
    yield from tasks.extract_tasks(RUN, KNOWN)


def task_recover():
    """Groups of parked files, for recovery with `doit forget -s recover:<selector>`."""
    yield from tasks.recover_tasks(RUN, KNOWN)
