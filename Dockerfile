# policyd: multi-stage build, non-root, health checked through gRPC health.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY policyd ./policyd
COPY clients/python/src ./clients/python/src
RUN python -m pip install --no-cache-dir --upgrade pip \
 && python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/policyd --create-home policyd
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER policyd
WORKDIR /var/lib/policyd
ENV POLICYD_LISTEN=0.0.0.0:50051 \
    POLICYD_DATABASE_URL=sqlite:////var/lib/policyd/policyd.db \
    POLICYD_METRICS_LISTEN=0.0.0.0:9464
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["policyd", "health", "--server", "127.0.0.1:50051", "--wait", "2"]
ENTRYPOINT ["policyd"]
CMD ["serve"]
