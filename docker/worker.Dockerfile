# syntax=docker/dockerfile:1
# The signal-worker image. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t signal-worker:dev .

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The registry cache only speeds up rebuilds; the binary is copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked -p signal-worker \
    && cp target/release/signal-worker /usr/local/bin/signal-worker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /usr/local/bin/signal-worker /usr/local/bin/signal-worker
# 65532 is distroless's "nonroot"; numeric so that runAsNonRoot can verify it.
USER 65532:65532
# /metrics, /healthz, /readyz
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/signal-worker"]
# The operator sets its own args; these defaults match the pipeline ConfigMap mount it creates.
CMD ["--pipeline", "/etc/signal/pipeline.yaml", "--listen", "0.0.0.0:9090", "--log-format", "json"]
