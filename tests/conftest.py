import sys
from pathlib import Path

# Test helper modules (tiny_dataset, fixtures_data) live next to the tests.
sys.path.insert(0, str(Path(__file__).parent))


# ---- dataset-layout fixtures for sources/decode tests (tests/fixtures_data.py) -------------
# Session-scoped: the trees are only read by the tests that use them.
import pytest  # noqa: E402

import fixtures_data as _fd  # noqa: E402


@pytest.fixture(scope="session")
def imagefolder_ds(tmp_path_factory):
    return _fd.make_imagefolder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="session")
def cifar100_ds(tmp_path_factory):
    return _fd.make_cifar100(tmp_path_factory.mktemp("cifar100"))


@pytest.fixture(scope="session")
def tinyimagenet_ds(tmp_path_factory):
    return _fd.make_tinyimagenet(tmp_path_factory.mktemp("tinyimagenet"))


@pytest.fixture(scope="session")
def voc_ds(tmp_path_factory):
    return _fd.make_voc(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="session")
def wds_ds(tmp_path_factory):
    return _fd.make_wds(tmp_path_factory.mktemp("wds"))


@pytest.fixture(scope="session")
def bad_images(tmp_path_factory):
    return _fd.make_bad_images(tmp_path_factory.mktemp("bad_images"))
# ---- end of dataset-layout fixtures ---------------------------------------------------------


@pytest.fixture()
def no_matplotlib(monkeypatch):
    """Imports of matplotlib fail, as without the `viz` extra."""
    import builtins

    real_import = builtins.__import__

    def blocked(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", blocked)
