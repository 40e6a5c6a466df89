# The `lacuna` image: the `lacuna` CLI (every job and serving pod's entrypoint) and the
# `lacuna-operator`, as a non-root user. The runtime keeps python3's pip and npm: stages fetch the
# reference model and the corpora at run time through those registry clients (`lacuna_data`).
#
#   docker build -t ghcr.io/lacuna-ml/lacuna:0.1.0 .

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
# The cargo registry and target directory are build caches, so rebuilds are incremental.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p lacuna-cli -p lacuna-operator --features lacuna-operator/otel --bins \
 && mkdir -p /out \
 && cp target/release/lacuna target/release/lacuna-operator /out/

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip npm \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 nonroot && useradd --uid 65532 --gid 65532 --no-create-home nonroot
COPY --from=build /out/lacuna /out/lacuna-operator /usr/local/bin/
# uid/gid 65532: the user the operator's pods run as (read-only root; /tmp and /cache are volumes).
USER 65532:65532
ENV LACUNA_CACHE=/cache HOME=/tmp
ENTRYPOINT ["lacuna"]
