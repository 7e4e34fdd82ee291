# relay: docker build -t relay . && docker run -p 8080:8080 -e RELAY_AUTH__SECRET=... -e RELAY_UPSTREAM__SECRET_KEY=sk_live_... relay
# Every setting comes from config.toml overridden by RELAY_<SECTION>__<KEY> environment variables.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

# uv from PyPI rather than a COPY --from of its image: builds that can reach only PyPI still work.
RUN pip install --no-cache-dir "uv==0.13.*"

WORKDIR /app

# Dependencies before the code, so a code change does not reinstall them.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project --no-cache

COPY relay/ ./relay/
COPY config.toml ./
RUN uv sync --frozen --no-dev --no-cache

RUN useradd --system --no-create-home --shell /usr/sbin/nologin --uid 10001 relay
USER relay

ENV PATH="/app/.venv/bin:${PATH}" \
    RELAY_SERVER__HOST=0.0.0.0
EXPOSE 8080

# slim has no curl; the port follows RELAY_SERVER__PORT when that is set.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RELAY_SERVER__PORT', '8080') + '/healthz', timeout=4)"]

ENTRYPOINT ["relay"]
CMD ["serve", "--config", "/app/config.toml"]
