# relayd as a sidecar: plain SMTP in on :1025 from the containers next to it, spool on a
# volume, verified implicit TLS out. Configured from RELAYD_* variables alone (no file needed);
# see docs/deploy.md and docker-compose.yml.
# BASE: any image with python3 and pip on PATH (scripts/container-proof builds on a local one).
ARG BASE=python:3.12-slim
FROM ${BASE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY relayd ./relayd
# DL3013 wants pinned names; this installs the copied source tree (with its uvloop extra),
# whose dependencies pyproject.toml bounds.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[uvloop]' \
    && rm -rf /src \
    && groupadd --system --gid 10025 relayd \
    && useradd --system --uid 10025 --gid 10025 --home-dir /var/lib/relayd \
        --no-create-home --shell /usr/sbin/nologin relayd \
    && install -d -m 0700 -o relayd -g relayd /var/lib/relayd

# Inside a container the listener has to bind beyond loopback. relayd refuses a non-loopback
# listen.host unless listen.allowed_networks lists who may submit, and this image deliberately
# leaves that unset: the container exits 78 naming the key until you set
# RELAYD_LISTEN_ALLOWED_NETWORKS (e.g. your Compose network's subnet). Do not publish 1025 on
# the host: anyone who can reach it sends mail as your provider account.
ENV RELAYD_LISTEN_HOST=0.0.0.0 \
    RELAYD_SPOOL_PATH=/var/lib/relayd \
    RELAYD_LOG_FORMAT=json

WORKDIR /var/lib/relayd
USER 10025:10025
VOLUME ["/var/lib/relayd"]
EXPOSE 1025
# Up, event loop turning, spool writable. Upstream trouble is reported but not fatal here
# (`relayd health --strict` makes it so): an outage is what the spool is for.
# Docker probes first one interval after start, and `depends_on: service_healthy` waits for
# it: a 5 s interval lets the app start about 5 s after relayd rather than 30 s. Engines
# before 25 (Debian 12's docker.io) reject --start-interval, which would allow probing fast
# only during the start period; docs/deploy.md shows it as a run-time option.
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=3 \
    CMD ["relayd", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["relayd"]
CMD ["serve"]
