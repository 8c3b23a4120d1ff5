"""A seeded random simulation: three real sshd servers, each rotating its log with the real logrotate
under another scheme, lines appended between rotations, and `doit run`s interleaved with faults: a run
killed with SIGKILL at a random moment, a run stopped with SIGTERM, a server cut off (its sshd and
sessions SIGSTOPped) during a run. After every completed run that exits 0 with every server reachable,
the invariant of tests/rotation.py holds and nothing is stuck.

Replay a failure with SIM_SEED=<the seed in its message> (the steps are listed there too); SIM_STEPS
sets the number of steps (default 60). The order of the steps and every choice come from the seed;
the moment a kill or a cut lands is timing, so a replay takes the same path but not always the same
instants.
"""

import os
import random
import signal
import subprocess
import time

from conftest import needs_root
from rotation import SCHEMES, LogRotator, assert_settled, invariant_problems

from relay import sandbox as sb

pytestmark = needs_root

SEED = int(os.environ.get("SIM_SEED") or random.SystemRandom().randrange(2**32))
STEPS = int(os.environ.get("SIM_STEPS") or 60)
KEEP = 6  # rotate 6; at most KEEP - 2 rotations between two good runs, so no file is rotated away unseen
SERVERS = ("srv1", "srv2", "srv3")
# Short enough that a cut server is given up within seconds (a keepalive each second, two missed).
FAST_FAILURE = {
    "SSH_CONNECT_TIMEOUT": "2",
    "SSH_SERVER_ALIVE_INTERVAL": "1",
    "SSH_SERVER_ALIVE_COUNT_MAX": "2",
    "SSH_DEADLINE": "20",
    "MAX_RETRY_COPY": "2",
}
RUN_TIMEOUT = 90  # seconds: no run here should take a tenth of it


def _signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Cut:
    """A server cut off the network: its sshd listener and every session SIGSTOPped (connections
    hang, new ones get no banner), until `restore` sends them SIGCONT."""

    def __init__(self, server):
        self.server = server
        self.stopped = []

    def start(self):
        pid = self.server.proc.pid
        _signal_all([pid], signal.SIGSTOP)  # first the listener: no new session while we look
        while True:  # a session may fork between the look and the stop: again until none is new
            new = [p for p in sb._descendants(pid) if p not in self.stopped]
            if not new:
                break
            _signal_all(new, signal.SIGSTOP)
            self.stopped += new
        self.stopped.append(pid)

    def restore(self):
        _signal_all(self.stopped + sb._descendants(self.server.proc.pid), signal.SIGCONT)
        self.stopped = []


class Simulation:
    """One world (conftest's Env) and the steps that change it."""

    def __init__(self, env, workdir, seed):
        self.env, self.workdir, self.seed = env, workdir, seed
        self.rng = random.Random(seed)
        schemes = self.rng.sample(sorted(SCHEMES), len(SERVERS))
        self.rotators = {
            name: LogRotator(env.remote(name), workdir / "logrotate", name, scheme=scheme, keep=KEEP, seed=seed)
            for name, scheme in zip(SERVERS, schemes)
        }
        self.pending = dict.fromkeys(SERVERS, 0)  # rotations since the last good run
        self.steps = []
        self.good_runs = 0
        self.runs = 0
        env.configure(env=FAST_FAILURE)

    def context(self, text=""):
        schemes = ", ".join(f"{n} {r.scheme}" for n, r in self.rotators.items())
        return (
            f"simulation seed {self.seed} (replay: SIM_SEED={self.seed}); {schemes}; {text}\n"
            "steps:\n  " + "\n  ".join(f"{i + 1}. {s}" for i, s in enumerate(self.steps))
        )

    # --- steps ---------------------------------------------------------------------------

    def write(self):
        name = self.rng.choice(SERVERS)
        count = self.rng.randint(1, 80)
        self.rotators[name].write(count)
        return f"write {count} line(s) on {name}"

    def rotate(self):
        name = self.rng.choice([n for n in SERVERS if self.pending[n] < KEEP - 2] or [None])
        if name is None:
            return self.run()  # every server has rotated as often as it may before a good run
        rot = self.rotators[name]
        count = self.rng.choice([0, self.rng.randint(1, 60)])  # 0: maybe nothing to rotate (notifempty)
        rot.write(count)
        rot.rotate()
        self.pending[name] += 1
        return f"{count} line(s) then logrotate on {name} ({rot.scheme}): {[p.name for p in rot.rotated_files()]}"

    def run(self):
        proc = self.env.doit("run")
        self.runs += 1
        assert proc.returncode == 0, self.context(f"a plain run exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        self.settled("a plain run")
        return "run: exit 0, settled"

    def kill(self):
        delay = round(self.rng.uniform(0.05, 1.0), 3)  # a run takes about 1 s here
        tree = self.rng.random() < 0.5
        code = self._interrupted(delay, signal.SIGKILL, tree)
        whom = "with all its descendants" if tree else "its own process"
        return f"run killed with SIGKILL ({whom}) after {delay}s: {code}"

    def terminate(self):
        delay = round(self.rng.uniform(0.05, 1.0), 3)
        code = self._interrupted(delay, signal.SIGTERM, False)
        return f"run stopped with SIGTERM after {delay}s: {code}"

    def cut(self):
        name = self.rng.choice(SERVERS)
        delay = round(self.rng.choice([0, self.rng.uniform(0, 0.8)]), 3)
        cut = Cut(self.env.box.servers[SERVERS.index(name)])
        proc, out = self._start()
        try:
            self._wait(proc, until=time.monotonic() + delay)
            if proc.poll() is None:
                cut.start()
            code = self._wait(proc, until=time.monotonic() + RUN_TIMEOUT, last=True)
        finally:
            cut.restore()
        assert code in (0, 1), self.context(f"a run with {name} cut off exited {code}\n{out.read_text()}")
        if code == 0:  # it finished before the cut mattered: a good run like any other
            self.settled(f"a run with {name} cut after {delay}s that exited 0")
            return f"{name} cut off after {delay}s: the run exited 0, settled"
        others = {n: [r] for n, r in self.rotators.items() if n != name}
        problems = [p for n, rots in others.items() for p in invariant_problems(self.env.data, n, rots)]
        assert not problems, self.context(f"{name} cut off: the other servers' files\n" + "\n".join(problems))
        return f"{name} cut off after {delay}s: exit 1, the other servers complete"

    # --- helpers -------------------------------------------------------------------------

    def settled(self, what):
        self.steps.append(f"({what}: checking)")
        assert_settled(self.env, {n: [r] for n, r in self.rotators.items()}, self.context(f"after {what}"))
        self.steps.pop()
        self.good_runs += 1
        self.pending = dict.fromkeys(SERVERS, 0)

    def _start(self):
        self.runs += 1
        out = self.workdir / f"run-{self.runs}.out"
        with open(out, "wb") as fh:
            proc = self.env.start(
                "run", stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        return proc, out

    def _wait(self, proc, until, last=False):
        """Wait for the run to end or the deadline `until` (monotonic); its exit code or None. With
        `last`, a run still going at the deadline is killed (its group) rather than left behind."""
        try:
            return proc.wait(timeout=max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            if last:
                _signal_all(sb._descendants(proc.pid) + [proc.pid], signal.SIGKILL)
                proc.wait()
            return None

    def _interrupted(self, delay, sig, tree):
        """A run that gets `sig` after `delay` seconds (if it is still going); its exit code, said."""
        proc, out = self._start()
        code = self._wait(proc, until=time.monotonic() + delay)  # the fault's moment: chosen, not awaited
        if code is None:
            if tree:  # as systemd stops a unit: the run's process group and everything it started
                descendants = sb._descendants(proc.pid)
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
                _signal_all(descendants, sig)
            else:  # as `kill PID` does: the run's own process (rsync and ssh live on in their groups)
                _signal_all([proc.pid], sig)
            code = self._wait(proc, until=time.monotonic() + RUN_TIMEOUT, last=True)
            assert code is not None, self.context(f"the run did not end within {RUN_TIMEOUT}s of {sig!r}")
            return f"exit {code}"
        assert code == 0, self.context(f"a run exited {code} before the fault\n{out.read_text()}")
        self.settled("a run that ended before its fault")
        return "it had ended: exit 0, settled"


STEP_WEIGHTS = {"write": 30, "rotate": 28, "run": 16, "kill": 10, "terminate": 8, "cut": 8}


def test_random_rotations_runs_and_faults_keep_every_line_once(env, tmp_path):
    print(f"simulation seed {SEED} (SIM_SEED={SEED} replays it), {STEPS} steps")
    sim = Simulation(env, tmp_path, SEED)
    names, weights = zip(*STEP_WEIGHTS.items())
    for _ in range(STEPS):
        step = sim.rng.choices(names, weights)[0]
        sim.steps.append(f"{step} …")
        started = time.monotonic()
        sim.steps[-1] = f"{getattr(sim, step)()} [{time.monotonic() - started:.1f}s]"
    for rot in sim.rotators.values():  # a last rotation of every log, then a good run over all of it
        rot.write(5)
        rot.rotate()
    sim.steps.append(sim.run())
    print(sim.context(f"passed: {sim.good_runs} good run(s) of {sim.runs}"))
    assert sim.good_runs >= 2 and len(sim.steps) >= STEPS, sim.context("too few good runs to check anything")
