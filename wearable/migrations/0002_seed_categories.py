"""Seed the 20 wearables of the original spec (staff edit them in admin afterwards)."""

from django.db import migrations

SEED = [
    "t-shirt",
    "shirt",
    "blouse",
    "sweater",
    "hoodie",
    "jacket",
    "coat",
    "dress",
    "skirt",
    "jeans",
    "trousers",
    "shorts",
    "sneakers",
    "boots",
    "sandals",
    "high heels",
    "hat",
    "sunglasses",
    "handbag",
    "watch",
]


def seed(apps, schema_editor):
    Category = apps.get_model("wearable", "Category")
    existing = set(Category.objects.values_list("name", flat=True))
    Category.objects.bulk_create(
        # Gaps of 10 leave room to slot a category in between without renumbering.
        Category(name=name, enabled=True, display_order=(i + 1) * 10)
        for i, name in enumerate(SEED)
        if name not in existing
    )


def unseed(apps, schema_editor):
    apps.get_model("wearable", "Category").objects.filter(name__in=SEED, prompts="").delete()


class Migration(migrations.Migration):
    dependencies = [("wearable", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
