# tokengate: a small image that runs as a non-root user.
#   docker build -t tokengate:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#     -v $PWD/deploy/container.toml:/etc/tokengate/proxy.toml:ro \
#     -e GENESYS_CLIENT_ID -e GENESYS_CLIENT_SECRET -e CLIENT_KEY_SHA256 -e ADMIN_KEY_SHA256 \
#     tokengate:0.1.0
# deploy/container.toml listens on 0.0.0.0 (a container's loopback is its own) and so
# wants a client key: CLIENT_KEY_SHA256 and ADMIN_KEY_SHA256 are key_sha256 lines of
# `tokengate key new`. Base images are named in full (podman refuses short names).

FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
# The dependencies first, in a layer of their own: rebuilt only when the manifests change.
COPY Cargo.toml Cargo.lock ./
COPY crates/sandbox/Cargo.toml crates/sandbox/Cargo.toml
COPY benches ./benches
RUN mkdir -p src crates/sandbox/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs crates/sandbox/src/lib.rs \
 && cargo build --release --locked --bin tokengate \
 && rm -rf src crates/sandbox/src
COPY src ./src
COPY crates ./crates
# Newer than the placeholders' build, so cargo rebuilds the two crates.
RUN touch src/main.rs src/lib.rs crates/sandbox/src/lib.rs \
 && cargo build --release --locked --bin tokengate

# distroless: glibc and CA certificates, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tokengate /usr/local/bin/tokengate
USER nonroot:nonroot
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/tokengate"]
CMD ["run", "-c", "/etc/tokengate/proxy.toml"]
