import logging

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import InterfaceError, OperationalError, connection

from clipsite.config import current

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "scripts/start.sh's migrations, as CLIP_MIGRATE says. true: apply them; if the database cannot be "
        "reached, the start fails. false: leave them to the deployment (the Kubernetes migration Job). auto "
        "(the default): apply them, but where a database server cannot be reached, say so loudly and let the "
        "server start without them, serving what needs no database (a SQLite file is always migrated)."
    )

    def handle(self, *args, **options):
        mode = current().migrate
        if mode == "false":
            logger.info("CLIP_MIGRATE=false: no migrations here; the deployment applies them (the migration Job)")
            return
        try:
            call_command("migrate", interactive=False, verbosity=options["verbosity"])
        except (OperationalError, InterfaceError) as exc:
            if mode == "true" or connection.vendor == "sqlite":
                raise CommandError(f"The migrations were not applied: the database failed: {exc}") from exc
            logger.error(
                "THE DATABASE CANNOT BE REACHED: migrations were NOT applied (%s). The server starts anyway: "
                "embeddings are served, and requests that need the database get 503 database_unavailable until "
                "it answers. Then apply them (python manage.py migrate), or set CLIP_MIGRATE=true to make the "
                "start fail instead.",
                exc,
            )
