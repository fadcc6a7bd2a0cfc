"""Shared fixtures: offline, few threads, tiny models built in code (no training)."""
import os

# Before anything imports huggingface_hub / transformers: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two threads by default (the target machine); FLASHDISTILL_TEST_THREADS overrides it, e.g. 1 on
# a machine whose cores are busy, where OpenMP threads spinning against each other are much slower.
torch.set_num_threads(int(os.environ.get("FLASHDISTILL_TEST_THREADS", "2")))

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
