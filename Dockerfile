# The support-router daemon; see docker-compose.yml for Redis and two instances.
FROM python:3.11-slim
WORKDIR /srv/support-router
COPY pyproject.toml README.md ./
COPY router ./router
COPY channels ./channels
COPY config ./config
RUN pip install --no-cache-dir . \
    && useradd --system --home-dir /srv/support-router router \
    && chown router /srv/support-router
USER router
ENV ROUTER_LISTEN=0.0.0.0:8080
EXPOSE 8080
CMD ["support-router", "run"]
