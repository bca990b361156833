# tokengate: a small image that runs as a non-root user.
#   docker build -t tokengate .
#   docker run --rm -p 8080:8080 -v $PWD/proxy.toml:/etc/tokengate/proxy.toml:ro \
#     -e GENESYS_CLIENT_ID -e GENESYS_CLIENT_SECRET tokengate
# In a container the proxy must listen on 0.0.0.0, so proxy.toml needs [[client]] keys
# (or allow_anonymous = true behind a network policy).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crates ./crates
COPY benches ./benches
RUN cargo build --release --locked --bin tokengate

# distroless: glibc and CA certificates, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tokengate /usr/local/bin/tokengate
USER nonroot:nonroot
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/tokengate"]
CMD ["run", "-c", "/etc/tokengate/proxy.toml"]
