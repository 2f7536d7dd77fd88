# The Palisade image, for people who build with Docker (or any OCI builder):
#   docker build -t ghcr.io/palisade-mesh/palisade:0.1.0 .
# The build stage runs deploy/image/build, the same script that assembles the image with no
# Docker and no base image (`.ci/run` does that), so both give the same FROM-scratch filesystem:
# the two binaries, iptables for `palisade init`, the C library, /etc/passwd and CA certificates.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --locked --release --bins \
 && deploy/image/build --bin-dir target/release --rootfs /rootfs --out /tmp/palisade.oci.tar

FROM scratch
COPY --from=build /rootfs /
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/palisade"]
