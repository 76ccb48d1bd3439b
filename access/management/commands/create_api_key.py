from django.core.management.base import BaseCommand, CommandError

from access.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key named NAME and print it (its last line): it is shown only this once."

    def add_arguments(self, parser):
        parser.add_argument("name", help="who or what uses the key, e.g. search-backend")

    def handle(self, *args, name, **options):
        if not name.strip():
            raise CommandError("the name must not be empty")
        key, raw = api_key_create(name=name)
        self.stderr.write(f"Created API key {key.name!r} ({key.prefix}...); store it now, it is not shown again:")
        self.stdout.write(raw)
