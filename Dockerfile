# mpswatch node agent. Build: docker build -t mpswatch .   Run: see deploy/README.md (host PID
# namespace, MPS dirs read-only, NVML through the NVIDIA container runtime).
# The base is pinned by digest (the multi-platform index of python:3.11-slim-bookworm, Python 3.11.16,
# built 2026-08-25: docker-library/repo-info, repos/python/remote/3.11-slim-bookworm.md); both stages
# use the same, so the virtualenv's interpreter path matches. To move on: deploy/README.md.
FROM python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN python -m venv /opt/mpswatch && /opt/mpswatch/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b
LABEL org.opencontainers.image.title="mpswatch" \
      org.opencontainers.image.description="Node agent that watches NVIDIA MPS daemons, servers, clients, GPUs and vLLM engines" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="README.md"
RUN useradd --system --uid 10101 --user-group --no-create-home --shell /usr/sbin/nologin mpswatch
COPY --from=build /opt/mpswatch /opt/mpswatch
ENV PATH=/opt/mpswatch/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYTHONUNBUFFERED=1
USER 10101:10101
EXPOSE 19863
# /healthz: 200 while the collection loops are alive (never GPU or MPS health). The interpreter of
# the image's virtualenv, no curl; plain HTTP on loopback, at the port of MPSWATCH_LISTEN if set, else
# the default. With the port set by flag or config file, or with TLS (web config), override it
# (deploy/README.md, "Health checks").
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/opt/mpswatch/bin/python", "-c", "import os, sys, urllib.request as u; port = os.environ.get('MPSWATCH_LISTEN', ':19863').rpartition(':')[2]; sys.exit(u.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status != 200)"]
ENTRYPOINT ["/opt/mpswatch/bin/mpswatch", "run"]
