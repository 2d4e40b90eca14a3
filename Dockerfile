# A Paymaster worker: takes tasks from Redis and runs them against the configured endpoints.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PAYMASTER_HOME=/var/lib/paymaster

WORKDIR /app
COPY pyproject.toml README.md ./
COPY agents ./agents
COPY budgets ./budgets
COPY orchestrator ./orchestrator
RUN pip install . \
    && useradd --system --create-home --home-dir /var/lib/paymaster paymaster

USER paymaster
# REDIS_URL and PAYMASTER_CONFIG come from the environment (see docker-compose.yml).
# SIGTERM lets running tasks finish (--grace seconds) before the worker exits.
STOPSIGNAL SIGTERM
CMD ["paymaster", "worker"]
