# clipsite: CPU image. The model named by CLIP_MODEL is fetched and prepared at container start into the
# /home/models/clip_models volume, unless it is already there.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CLIP_MODELS_DIR=/home/models/clip_models \
    HF_HOME=/home/models/hf-home \
    PORT=8081

RUN groupadd --system clip \
    && useradd --system --gid clip --create-home --home-dir /home/clip clip \
    && mkdir -p /home/models/clip_models /app/var \
    && chown -R clip:clip /home/models /app

WORKDIR /app

# CPU build of torch by default (the default wheel on Linux carries CUDA, several GB a CPU never uses).
# A CUDA image: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t clipsite:cuda .
# and run it with CLIP_DEVICE=cuda (docker run --gpus all ...).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements.txt .
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX}" -r requirements.txt

COPY --chown=clip:clip . .
USER clip
# A key for this build step only: settings would otherwise keep a generated one in the image.
RUN DJANGO_SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput -v 0

# The models (and their ONNX exports), and var/: the SQLite database and the generated secret key.
VOLUME ["/home/models/clip_models", "/app/var"]
EXPOSE 8081
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"8081\")}/readyz', timeout=4)" || exit 1

CMD ["./scripts/start.sh"]
