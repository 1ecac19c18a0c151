# Small static images for both binaries:
#   docker build --target proxy    -t mrcp-lb/lb-proxy:0.1.0 .
#   docker build --target operator -t mrcp-lb/lb-operator:0.1.0 .
# (No Docker engine on the development machine: this recipe is not built in CI.)

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
RUN rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p lb-proxy -p lb-operator \
 && mkdir /out \
 && cp target/x86_64-unknown-linux-musl/release/lb-proxy target/x86_64-unknown-linux-musl/release/lb-operator /out/

FROM gcr.io/distroless/static-debian12:nonroot AS proxy
COPY --from=build /out/lb-proxy /usr/local/bin/lb-proxy
USER 65532:65532
EXPOSE 5060/udp 5060/tcp 5061/tcp 8081/tcp
ENTRYPOINT ["/usr/local/bin/lb-proxy"]

FROM gcr.io/distroless/static-debian12:nonroot AS operator
COPY --from=build /out/lb-operator /usr/local/bin/lb-operator
USER 65532:65532
EXPOSE 8080/tcp
ENTRYPOINT ["/usr/local/bin/lb-operator"]
