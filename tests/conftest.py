"""Shared fixtures: offline, few threads, tiny models built in code (no training)."""
import os
import time

# Before anything imports huggingface_hub / transformers: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _busy_cores(seconds: float = 0.5) -> float:
    """Cores kept busy by other processes right now (this one sleeps while it measures), from
    /proc/stat; the one-minute load average where there is no /proc."""
    def ticks():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all, idle + iowait

    try:
        a0, i0 = ticks()
        time.sleep(seconds)
        a1, i1 = ticks()
        return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(a1 - a0, 1))
    except OSError:
        return os.getloadavg()[0]


def _default_threads() -> int:
    """Two threads (the target machine), or one when another job already keeps a core busy:
    OpenMP threads spinning against another job's are much slower than one thread (a loaded
    2-thread run once stalled for over half an hour in one test). FLASHDISTILL_TEST_THREADS
    overrides both."""
    if "FLASHDISTILL_TEST_THREADS" in os.environ:
        return int(os.environ["FLASHDISTILL_TEST_THREADS"])
    if (os.cpu_count() or 1) < 2:
        return 1
    return 1 if _busy_cores() >= 0.7 else 2


THREADS = _default_threads()
torch.set_num_threads(THREADS)
# subprocesses the tests start (CLI runs, accelerate launches) follow the same choice
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

TINY_CHANNELS = [8, 16]  # multiples of norm_num_groups=8; about 80k UNet parameters


@pytest.fixture(scope="session")
def tiny_channels():
    return list(TINY_CHANNELS)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A teacher folder written by ``TeacherTraining.finalize`` from a freshly initialised (untrained)
    tiny UNet: valid on disk and loadable, produced in well under a second."""
    from flashdistill.methods.dsm import TeacherConfig, TeacherTraining

    out = tmp_path_factory.mktemp("tiny_teacher")
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        method = TeacherTraining(TeacherConfig(channels=list(TINY_CHANNELS)))
    method.finalize(out, {"unet": method.unet})
    return out


@pytest.fixture(scope="session")
def digits_train():
    from flashdistill.data.digits import get_dataset

    return get_dataset("digits", "train")


@pytest.fixture(scope="session")
def make_method():
    """``make_method(init_seed=0, **train_overrides)``: a tiny TeacherTraining on digits with
    batch_size 8, constructed with the global RNG seeded to ``init_seed`` (which should not matter:
    the initialisation is meant to follow ``train.seed``) and restored afterwards."""
    from flashdistill.config import from_dict
    from flashdistill.methods.dsm import TeacherConfig, TeacherTraining

    def make(init_seed: int = 0, **train):
        cfg = from_dict(TeacherConfig, {"channels": list(TINY_CHANNELS),
                                        "train": {"batch_size": 8, **train}})
        with torch.random.fork_rng():
            torch.manual_seed(init_seed)
            return TeacherTraining(cfg)

    return make
