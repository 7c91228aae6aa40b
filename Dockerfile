# syntax=docker/dockerfile:1
# tango-auth-proxy: a multi-stage build. The build stage compiles the release binary on the
# official Rust image; the runtime stage is distroless "cc" (glibc, no shell, non-root 65532) on
# the same Debian release, so the binary's glibc matches.
#
#   docker build -t tango-auth-proxy:0.1.0 \
#     --build-arg SOURCE=https://git.example.com/you/tango-auth-proxy --build-arg REVISION=$(git rev-parse HEAD) .
#
# Nothing is fetched at run time: the image holds the binary and a default config only.

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when Cargo.toml or Cargo.lock
# change. The stubs stand in for the crate's own sources, benches and examples.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches examples \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > benches/dpop.rs \
 && echo 'fn main() {}' > examples/bench_upstream.rs \
 && cargo build --release --locked --bin tango-auth-proxy \
 && rm -rf src benches examples
COPY src ./src
COPY benches ./benches
COPY examples ./examples
# The stubs' build artefacts are older than the real sources; touching makes cargo rebuild them.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin tango-auth-proxy \
 && cp target/release/tango-auth-proxy /tango-auth-proxy

FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG SOURCE=""
ARG REVISION=""
LABEL org.opencontainers.image.title="tango-auth-proxy" \
      org.opencontainers.image.description="Local reverse proxy that attaches Tango RaaS credentials (Basic, OAuth 2.0, DPoP)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /tango-auth-proxy /usr/local/bin/tango-auth-proxy
# The default config reads its credentials from files under /run/secrets/tango/ (mount them
# there, or mount your own config over this file, or point TANGO_PROXY_CONFIG elsewhere).
COPY config/container.toml /etc/tango-auth-proxy/proxy.toml
ENV TANGO_PROXY_CONFIG=/etc/tango-auth-proxy/proxy.toml \
    TANGO_PROXY_LOG_FORMAT=json
# distroless "nonroot": a fixed UID/GID that owns nothing in the image; the root filesystem
# can be read-only (the proxy writes nothing unless the file cache is configured).
USER 65532:65532
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["/usr/local/bin/tango-auth-proxy", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/tango-auth-proxy"]
CMD ["serve"]
