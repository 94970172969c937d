# cairn: one node per container. Built by cluster-compose.yml; also usable alone:
#
#   docker build -t cairn:local .
#   docker run -v /srv/n1:/data -v /srv/etc:/etc/cairn:ro -e CAIRN_ADMIN_PASSWORD=... \
#     -p 127.0.0.1:9925:9925 cairn:local
#
# The node reads /etc/cairn/cairn.toml (every key also as CAIRN_<SECTION>_<KEY>, see
# docs/configuration.md) and keeps its data in /data. It runs as the unprivileged user
# cairn (uid 10001): give that uid the data volume and read access to the key.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY node ./node
COPY replication ./replication
COPY storage ./storage
RUN pip install . \
    && rm -rf /src \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin cairn \
    && mkdir -p /ca /certs /data /etc/cairn \
    && chown cairn:cairn /ca /certs /data

USER cairn
WORKDIR /data
# the operations API and the replication port (cairn's defaults)
EXPOSE 9925 9933
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9925/health', timeout=2)"]
CMD ["cairn", "node", "run", "--config", "/etc/cairn/cairn.toml"]
