from django.apps import AppConfig


class WearableConfig(AppConfig):
    name = "wearable"
    verbose_name = "Wearable categories"

    def ready(self) -> None:
        from wearable import checks  # noqa: F401  (registers the system checks)
