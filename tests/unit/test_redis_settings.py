"""RedisSettings: one typed object for reaching the farm's Redis, checked when made, never showing its password."""

import pytest

from renderfarm.cluster.redis_settings import RETRY_ATTEMPTS, RedisSettings
from renderfarm.errors import ConfigError, RenderfarmError


def test_built_from_a_url_with_the_farm_retry_policy_and_overrides():
    settings = RedisSettings.from_url("redis://:s3cret@10.0.0.5:6390/2")
    assert settings.url == "redis://:s3cret@10.0.0.5:6390/2" and settings.retry_attempts == RETRY_ATTEMPTS
    quick = RedisSettings.from_url(settings, socket_timeout=2.0, retry_attempts=0)
    assert (quick.url, quick.socket_timeout, quick.retry_attempts) == (settings.url, 2.0, 0)
    assert RedisSettings.from_url(settings) is settings


def test_the_password_never_shows():
    settings = RedisSettings.from_url("redis://farm:s3cret@10.0.0.5:6390/0")
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)
    assert settings.redacted == "redis://farm:***@10.0.0.5:6390/0"


@pytest.mark.parametrize("url, field", [
    ("redis://:s3cret@host:notaport/0", "invalid Redis URL"),
    ("http://host:6379", "invalid Redis URL"),
    ("", "Redis URL"),
])
def test_a_bad_url_is_a_config_error_that_names_it_redacted(url, field):
    with pytest.raises(ConfigError, match=field) as caught:
        RedisSettings.from_url(url)
    assert "s3cret" not in str(caught.value)
    assert isinstance(caught.value, RenderfarmError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("field, value", [("socket_timeout", 0), ("retry_attempts", -1)])
def test_bad_numbers_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        RedisSettings("redis://127.0.0.1:6379/0", **{field: value})
