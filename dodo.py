"""logpipe-relay task graph: `doit run`, `doit run extract:SERVER`, `doit forget -s recover:… && doit run`."""

from relay import tasks

DOIT_CONFIG = tasks.doit_config()


def task_fetch():
    """Fetch new remote files with rsync over ssh (batched per server)."""
    yield from tasks.fetch_tasks(tasks.plans())


def task_verify():
    """Hash, detect the format and check size/mtime against the listing."""
    yield from tasks.verify_tasks(tasks.plans())


def task_extract():
    """Extract, file under extracted/ and move the source to processed/ (per server group)."""
    yield from tasks.extract_tasks(tasks.plans())


def task_recover():
    """Groups of parked files, for recovery with `doit forget -s recover:<selector>`."""
    yield from tasks.recover_tasks(tasks.plans())
