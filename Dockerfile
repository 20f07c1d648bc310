# syntax=docker/dockerfile:1.7
# One image, three services: mobile-api, mobile-gateway and mobile-worker.
#
#   docker build -t mobile-backend .
#   docker run --rm mobile-backend mobile-api --help
#
# Stages: `chef` installs cargo-chef; `planner` reduces the workspace to a recipe of
# its dependencies; `builder` builds those first (a layer that changes only when
# Cargo.lock or a manifest does), then the binaries. Queries are checked at run time
# by the tests, not at compile time, so no database and no sqlx offline data are
# needed here; the migrations are compiled into mobile-api.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.71
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ENV CARGO_TERM_COLOR=never
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json \
        -p mobile-api -p mobile-gateway -p mobile-worker
COPY . .
RUN cargo build --release --locked -p mobile-api -p mobile-gateway -p mobile-worker \
    && mkdir -p /out/bin /out/media \
    && cp target/release/mobile-api target/release/mobile-gateway target/release/mobile-worker /out/bin/

# distroless/cc: glibc, CA certificates, tzdata, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mobile-backend" \
      org.opencontainers.image.description="REST API, WebSocket gateway and job worker for mobile apps" \
      org.opencontainers.image.source="https://github.com/mobile-backend/mobile-backend" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=builder /out/bin/ /usr/local/bin/
# Where STORAGE_URL's default points; owned by the runtime user so a volume mounted
# here starts writable.
COPY --from=builder --chown=65532:65532 /out/media /var/lib/mobile/media
USER 65532:65532
ENV LOG_FORMAT=json
EXPOSE 8080 8081 8082 9090 9091 9092
CMD ["mobile-api"]
