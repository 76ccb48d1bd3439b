from django.apps import AppConfig


class WearableConfig(AppConfig):
    name = "wearable"
    verbose_name = "Wearable categories"
