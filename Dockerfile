# tokenproxy as a container: slim Python, non-root, `tokenproxy run` as the entry point.
# Build:  docker build -t tokenproxy .
# Run:    docker run --rm -v $PWD/deploy/tokenproxy.toml:/etc/tokenproxy/tokenproxy.toml:ro \
#           -e CLIENT_SECRET -e REFRESH_TOKEN --network host tokenproxy
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /var/lib/tokenproxy --create-home tokenproxy \
    && mkdir -p /etc/tokenproxy && chmod 0700 /var/lib/tokenproxy
COPY deploy/tokenproxy.toml /etc/tokenproxy/tokenproxy.toml
USER tokenproxy
WORKDIR /var/lib/tokenproxy
ENV TOKENPROXY_CONFIG=/etc/tokenproxy/tokenproxy.toml

EXPOSE 8080 8081
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tokenproxy", "run", "-c", "/etc/tokenproxy/tokenproxy.toml"]
