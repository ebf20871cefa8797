# syntax=docker/dockerfile:1
# The signal-operator image. Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t signal-operator:dev .

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The registry cache only speeds up rebuilds; the binary is copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked -p signal-operator \
    && cp target/release/signal-operator /usr/local/bin/signal-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /usr/local/bin/signal-operator /usr/local/bin/signal-operator
# 65532 is distroless's "nonroot"; numeric so that runAsNonRoot can verify it.
USER 65532:65532
# /metrics, /healthz, /readyz
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/signal-operator"]
CMD ["run"]
