# syntax=docker/dockerfile:1
# Both images from one file:
#   docker build --target gateway         -t egress-gateway:0.1.0 .
#   docker build --target node-redirector -t egress-node-redirector:0.1.0 .
# The binaries are built by scripts/build-release.sh, the same script CI runs.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    ./scripts/build-release.sh \
 && install -D -m 0755 target/release/egress-gateway /out/egress-gateway \
 && install -D -m 0755 target/release/node-redirector /out/node-redirector

# The gateway: glibc and CA roots only (no shell, no package manager), non-root.
FROM gcr.io/distroless/cc-debian12:nonroot AS gateway
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="egress-gateway" \
      org.opencontainers.image.description="Kubernetes egress gateway: HTTP/CONNECT, SOCKS5 and transparent proxy with domain policy, a metadata guard and audit events" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/egress-dev/egress-gateway"
COPY --from=build /out/egress-gateway /usr/local/bin/egress-gateway
USER 65532:65532
EXPOSE 3128 1080 9090
ENTRYPOINT ["/usr/local/bin/egress-gateway"]
CMD ["run", "--config", "/etc/egress-gateway/gateway.yaml"]

# The node-redirector: needs nft(8), applies its table with `nft -j -f`. It runs as root with
# only CAP_NET_ADMIN (the DaemonSet drops every other capability): Kubernetes grants added
# capabilities to root only.
FROM debian:bookworm-slim AS node-redirector
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="egress-node-redirector" \
      org.opencontainers.image.description="Per-node nftables steering of selected Pods' egress to the egress gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/egress-dev/egress-gateway"
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/node-redirector /usr/local/bin/node-redirector
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["/usr/local/bin/node-redirector"]
CMD ["run", "--config", "/etc/node-redirector/node-redirector.yaml"]
