# guardrail container image.
#   docker build -t guardrail .
#   docker run --rm guardrail --help
#
# librdkafka is built from source by rdkafka-sys (zlib vendored via the `libz-static` feature),
# so the builder only needs a C toolchain and perl; no cmake, python3 or zlib1g-dev.

FROM rust:1.85-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential perl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin guardrail

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home --uid 10001 guardrail
COPY --from=builder /build/target/release/guardrail /usr/local/bin/guardrail
COPY config/ /etc/guardrail/
USER guardrail
EXPOSE 9464
ENTRYPOINT ["guardrail"]
CMD ["run", "--config", "/etc/guardrail/guardrail.toml"]
