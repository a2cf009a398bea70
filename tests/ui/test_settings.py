"""Settings kept in .streamlit/secrets.toml reach the engine through the environment."""

from __future__ import annotations

from ui.settings import apply_secrets


def test_secrets_toml_values_become_environment_variables_unless_already_set(tmp_path, monkeypatch):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('ETL_BATCH_SIZE = 2000\nETL_QUEUE = "from-secrets"\nOTHER = "ignored"\n'
                       '[dataloader]\nETL_RETRY_MAX_SECONDS = 5\n')
    monkeypatch.delenv("ETL_BATCH_SIZE", raising=False)
    monkeypatch.delenv("ETL_RETRY_MAX_SECONDS", raising=False)
    monkeypatch.setenv("ETL_QUEUE", "from-env")
    copied = apply_secrets(secrets)
    import os

    assert sorted(copied) == ["ETL_BATCH_SIZE", "ETL_RETRY_MAX_SECONDS"]
    assert os.environ["ETL_BATCH_SIZE"] == "2000" and os.environ["ETL_QUEUE"] == "from-env"
    assert "OTHER" not in os.environ
