"""Settings for the test suite: the product's settings, with the model loaded by fixtures instead."""

from dataclasses import replace

from clipsite.settings import *  # noqa: F403

# Fixtures load the test models into the runtime themselves.
CLIPSITE = replace(CLIPSITE, runtime=replace(CLIPSITE.runtime, warmup=False))  # noqa: F405
STORAGES["staticfiles"]["BACKEND"] = "django.contrib.staticfiles.storage.StaticFilesStorage"  # noqa: F405
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in admin tests
STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # noqa: F405 - whitenoise warns when it is missing
# Rate-limit counts live in memory during tests, so runs never see each other's (servers use the file cache).
CACHES = {**CACHES, "throttle": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "throttle"}}  # noqa: F405
