# heinfer server image. The container runs exactly `heinfer serve`, configured by HEINFER_*
# environment variables: the same command the integration tests start outside Docker
# (tests/test_client_cli.py checks that this CMD is what they run).
# Base image pinned by full version and Debian release (bumped deliberately: docs/RELEASING.md).
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies first, exactly as locked (versions and hashes): a layer that survives code changes.
COPY requirements/server.txt ./requirements/server.txt
RUN pip install --require-hashes -r requirements/server.txt
COPY pyproject.toml README.md LICENSE ./
COPY heinfer ./heinfer
COPY packing ./packing
COPY server ./server
COPY client ./client
COPY models ./models
# The project itself, non-editable, resolving nothing more (tests/test_packaging.py builds a wheel
# from exactly these files).
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin heinfer \
    && mkdir -p /data && chown heinfer:heinfer /data

USER heinfer
# Bind all interfaces inside the container; docker-compose.yml publishes on the host's loopback.
ENV HEINFER_HOST=0.0.0.0 \
    HEINFER_PORT=8000 \
    HEINFER_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["heinfer", "health", "--url", "http://127.0.0.1:8000"]
CMD ["heinfer", "serve"]
