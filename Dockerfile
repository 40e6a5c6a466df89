# The `lacuna` image: the `lacuna` CLI (every job and serving pod's entrypoint) and the
# `lacuna-operator`, on a distroless runtime as a non-root user.
#
#   docker build -t ghcr.io/lacuna-ml/lacuna:0.1.0 .

FROM docker.io/library/rust:1.90-bookworm AS build
WORKDIR /src
# The cargo registry and target directory are build caches, so rebuilds are incremental.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p lacuna-cli -p lacuna-operator --features lacuna-operator/otel --bins \
 && mkdir -p /out \
 && cp target/release/lacuna target/release/lacuna-operator /out/

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/lacuna /out/lacuna-operator /usr/local/bin/
# distroless `nonroot`: uid/gid 65532, the user the operator's pods run as.
USER 65532:65532
ENV LACUNA_CACHE=/cache HOME=/tmp
ENTRYPOINT ["lacuna"]
