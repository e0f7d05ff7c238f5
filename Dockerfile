# The controller's image, as the Helm chart runs it (non-root, read-only root filesystem).
# Not built in CI here: this workplace has no container engine.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY canary ./canary
RUN pip install --no-cache-dir . \
    && useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin canary
USER 65532
ENV PYTHONDONTWRITEBYTECODE=1
ENTRYPOINT ["canary"]
