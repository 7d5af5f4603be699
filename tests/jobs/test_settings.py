"""The service settings: from the environment, with refusals that keep production safe."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from api.auth import hash_key, new_key
from jobs.settings import Settings
from jobs.webhooks import signed_headers, verify


def test_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    key, digest = new_key()
    assert hash_key(key) == digest and key.startswith("sk_")
    monkeypatch.setenv("SUPIR_STORAGE", "s3")
    monkeypatch.setenv("SUPIR_API_KEYS", json.dumps([{"id": "app", "sha256": digest, "max_active_jobs": 2}]))
    monkeypatch.setenv("SUPIR_JOB_TIME_LIMIT_S", "100")
    monkeypatch.setenv("SUPIR_MODEL_CONFIG", "/models/tiny.json")
    settings = Settings()
    assert settings.storage == "s3" and settings.api_keys[0].max_active_jobs == 2
    assert settings.visibility_timeout_s == 100 + settings.visibility_margin_s
    assert str(settings.model_config_file) == "/models/tiny.json"


def test_an_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """`SUPIR_VARIANTS=` (compose's `${SUPIR_VARIANTS:-}`, an empty ConfigMap value) is the default, not a crash."""
    for name in ("SUPIR_VARIANTS", "SUPIR_API_KEYS", "SUPIR_JOB_TIME_LIMIT_S", "SUPIR_MODEL_CONFIG"):
        monkeypatch.setenv(name, "")
    settings, default = Settings(), Settings.model_construct()
    assert settings.variants == {} and settings.api_keys == []
    assert settings.job_time_limit_s == default.job_time_limit_s and settings.model_config_file is None


def test_production_refuses_placeholder_secrets_and_dev_mode() -> None:
    with pytest.raises(ValidationError, match="SUPIR_SIGNING_SECRET"):
        Settings(environment="production")
    with pytest.raises(ValidationError, match="DEV_MODE"):
        Settings(environment="production", signing_secret="s" * 32, webhook_secret="w" * 32, dev_mode=True)
    assert (
        Settings(environment="production", signing_secret="s" * 32, webhook_secret="w" * 32).environment == "production"
    )


def test_production_refuses_the_example_secrets_and_short_ones() -> None:
    """Every value of deploy/k8s/secret.example.yaml is refused as it stands, and so is a short secret."""
    import yaml

    from tests.servers import REPO

    example: dict[str, str] = {}
    for doc in yaml.safe_load_all((REPO / "deploy/k8s/secret.example.yaml").read_text()):
        example |= doc["stringData"]
    real = {"signing_secret": "s" * 32, "webhook_secret": "w" * 32}
    for name, value in example.items():
        field = name.removeprefix("SUPIR_").lower()
        if field == "api_keys" or not name.startswith("SUPIR_"):
            continue  # the keys (keys.json, a file): the placeholder is no valid hash, refused by its own validation
        with pytest.raises(ValidationError, match=name):
            Settings(environment="production", **{**real, field: value})
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(environment="production", signing_secret="short-but-not-a-placeholder", webhook_secret="w" * 32)


def test_webhook_signatures_expire() -> None:
    body = b'{"event":"job.succeeded"}'
    headers = signed_headers("secret", body, now=1000)
    assert verify("secret", headers, body, now=1100)
    assert not verify("secret", headers, body, now=2000)  # a replay ten minutes later
