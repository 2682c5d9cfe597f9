# meshscope in a container: one binary with every role (serve, collector, query, demo,
# proxy). The build installs the wasm target for the web UI by itself (ui/build.rs).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p meshscope \
 && cp target/release/meshscope /usr/local/bin/meshscope

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/meshscope /usr/local/bin/meshscope
EXPOSE 4317 4318 8080 5433
ENTRYPOINT ["meshscope"]
# Beyond loopback meshscope wants tokens: mount an auth file and pass
# `--auth-file /etc/meshscope/auth.toml` in place of --insecure-no-auth (README: security).
CMD ["serve", "--data-dir", "/data", "--otlp-grpc-addr", "0.0.0.0:4317", \
     "--otlp-http-addr", "0.0.0.0:4318", "--http-addr", "0.0.0.0:8080", "--pg-addr", "0.0.0.0:5433", \
     "--insecure-no-auth"]
