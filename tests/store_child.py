"""A harvest run in a child process by tests/test_store_faults.py, so that real faults can hit it.

    python store_child.py PATH MODE [--resume] [--lock-timeout S]

MODE says where the child dies or waits:
  plain             harvest to the end
  file:K            SIGKILL itself halfway through writing the data of the K-th .npy file
  fsync:N           SIGKILL itself at the N-th directory fsync (1: the new manifest; per chunk then: the
                    chunk folder, the rename into place, the manifest that lists it)
  manifest:N        SIGKILL itself halfway through writing the N-th manifest
  slow              sleep a little before each batch (the parent kills it from outside)
  gate:FILE         before batch 3, wait until FILE exists (holding the store's lock meanwhile)
It prints ``written ROWS`` after every chunk the manifest lists, ``blocked`` when it has to wait for
the lock, ``locked`` (exit 3) on StoreLockedError and ``done ROWS`` at the end.
"""
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_store import cnn_model, make_batches  # noqa: E402

import workbench as wb  # noqa: E402
from workbench._errors import StoreLockedError  # noqa: E402
from workbench.hooks import _disk  # noqa: E402

N_BATCHES, NAMES = 8, ["1", "4"]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def instrument(mode: str) -> None:
    kind, _, arg = mode.partition(":")
    real_write = _disk.ShardWriter.write

    def write(self, *args, **kwargs):
        real_write(self, *args, **kwargs)
        print("written", sum(c["rows"] for c in self.manifest["chunks"]), flush=True)
    _disk.ShardWriter.write = write

    if kind == "file":
        files = [0]
        real_init = _disk._HashingFile.__init__

        def init(self, f):
            real_init(self, f)
            files[0] += 1
            self.number = files[0]

        def hashing_write(self, data):
            if self.number == int(arg) and self.nbytes > 0:  # past the header: the array's bytes
                self._f.write(bytes(data)[: len(data) // 2])
                self._f.flush()
                die()
            self.hash.update(data)
            self.nbytes += len(data)
            return self._f.write(data)
        _disk._HashingFile.__init__, _disk._HashingFile.write = init, hashing_write
    elif kind == "fsync":
        calls, real_fsync = [0], _disk.fsync_dir

        def fsync_dir(folder):
            calls[0] += 1
            if calls[0] == int(arg):
                die()
            real_fsync(folder)
        _disk.fsync_dir = fsync_dir
    elif kind == "manifest":
        calls, real_json = [0], _disk.write_json_atomic

        def write_json_atomic(path, obj):
            calls[0] += 1
            if calls[0] == int(arg):
                import json

                text = json.dumps(obj)
                with open(path.with_name(f"{path.name}.tmp-{os.getpid()}"), "w") as f:
                    f.write(text[: len(text) // 2])
                die()
            real_json(path, obj)
        _disk.write_json_atomic = write_json_atomic


def batches(mode: str):
    kind, _, arg = mode.partition(":")
    for i, b in enumerate(make_batches(N_BATCHES)):
        if kind == "slow":
            time.sleep(0.3)
        if kind == "gate" and i == 3:
            while not Path(arg).exists():
                time.sleep(0.02)
        yield b


def main() -> None:
    path, mode = sys.argv[1], sys.argv[2]
    resume = "--resume" in sys.argv
    timeout = 0.0
    if "--lock-timeout" in sys.argv:
        value = sys.argv[sys.argv.index("--lock-timeout") + 1]
        timeout = None if value == "none" else float(value)
    instrument(mode)
    if timeout is None:  # report when the lock is contended, then wait as asked
        import filelock

        real_acquire = filelock.FileLock.acquire

        def acquire(self, timeout=None, **kw):
            try:
                return real_acquire(self, timeout=0)
            except filelock.Timeout:
                print("blocked", flush=True)
            return real_acquire(self, timeout=timeout, **kw)
        filelock.FileLock.acquire = acquire
    try:
        store = wb.harvest(cnn_model(), batches(mode), names=NAMES, path=path, progress=False, resume=resume,
                           chunk_bytes=1, lock_timeout=timeout)
    except StoreLockedError as e:
        print("locked", e, flush=True)
        sys.exit(3)
    print("done", len(store), flush=True)


if __name__ == "__main__":
    main()
