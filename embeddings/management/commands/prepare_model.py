from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from embeddings.conf import runtime_backend
from embeddings.runtime.loading import ModelLoadError, load_model, resolve_model_source


class Command(BaseCommand):
    help = (
        "Make sure the configured model is on disk before serving: fetch a hub id once into CLIP_MODELS_DIR, "
        "check a folder, or build the random-weight test model when nothing is configured; with the ONNX "
        "runtime, export (and quantise) it once so the workers only load the cached files."
    )

    def handle(self, *args, **options):
        try:
            source = resolve_model_source(settings.CLIP_MODEL, settings.CLIP_MODELS_DIR)
        except ModelLoadError as exc:
            raise CommandError(f"cannot use CLIP_MODEL={settings.CLIP_MODEL!r}: {exc}") from exc
        if source.test_model:
            self.stderr.write(
                self.style.WARNING(
                    f"WARNING: serving a RANDOM-WEIGHT TEST MODEL ({source.name}) from {source.model_dir}; "
                    "its vectors carry no meaning. Set CLIP_MODEL to a real model."
                )
            )
        self.stdout.write(f"Model {source.name or source.model_dir} ({source.kind}) at {source.model_dir}")
        if runtime_backend() == "onnx":
            self._export(source)

    def _export(self, source) -> None:
        from transformers import AutoTokenizer

        from embeddings.runtime.encoder import text_input_names
        from embeddings.runtime.onnx import prepare_onnx_files

        try:
            names = text_input_names(AutoTokenizer.from_pretrained(source.processor_dir))
            files = prepare_onnx_files(
                lambda: load_model(source)[0],
                source.model_dir,
                quantize=settings.CLIP_QUANTIZE,
                text_input_names=names,
            )
        except ModelLoadError as exc:
            raise CommandError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - the workers fall back to torch for float32; say so now
            if settings.CLIP_QUANTIZE != "none":
                raise CommandError(f"cannot export {source.name} to ONNX for int8: {exc}") from exc
            self.stderr.write(self.style.WARNING(f"ONNX export failed ({exc}); the workers will use PyTorch"))
            return
        self.stdout.write(f"ONNX files ready: {', '.join(str(f) for f in files.values())}")
