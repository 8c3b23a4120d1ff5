"""logpipe-relay task graph: `doit run`, `doit run extract:SERVER`, `doit forget -s recover:… && doit run`."""

from relay import tasks

DOIT_CONFIG = tasks.doit_config()


def task_fetch():
    """Fetch new remote files with rsync over ssh, one batch per server."""
    yield from tasks.fetch_tasks(tasks.plans())


def task_extract():
    """Verify, extract and file each due file; `extract:SERVER` is everything for one server."""
    yield from tasks.extract_tasks(tasks.plans())


def task_settle():
    """Wait for a server's background work (a step of `extract:SERVER`)."""
    yield from tasks.settle_tasks(tasks.plans())


def task_recover():
    """Groups of parked files, for recovery with `doit forget -s recover:<selector>`."""
    yield from tasks.recover_tasks(tasks.plans())
