# mpswatch node agent. Build: docker build -t mpswatch .   Run: see deploy/README.md (host PID
# namespace, MPS dirs read-only, NVML through the NVIDIA container runtime).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
RUN python -m venv /opt/mpswatch && /opt/mpswatch/bin/pip install --no-cache-dir .

FROM python:3.11-slim-bookworm
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
ENTRYPOINT ["/opt/mpswatch/bin/mpswatch", "run"]
