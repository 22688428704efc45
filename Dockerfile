# The gateway alone, in a small image (the testbed's images are under testbed/docker/):
#
#   docker build -t regiongate .
#   docker run -p 6432:6432 -p 9930:9930 -v "$PWD/regiongate.yaml:/etc/regiongate/regiongate.yaml:ro" regiongate
#
# The configuration is mounted at /etc/regiongate/regiongate.yaml; `docker kill -s HUP` reloads it, `docker stop`
# drains (SIGTERM: transactions finish, up to shutdown_timeout). Migrations are shipped beside the binary:
#   docker run --rm -v "$PWD/regiongate.yaml:/etc/regiongate/regiongate.yaml:ro" regiongate migrate /etc/regiongate/regiongate.yaml

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p regiongate && strip target/release/regiongate

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin regiongate
# `regiongate migrate` finds /opt/regiongate/migrations on its own (beside the binary's directory).
COPY --from=build /src/target/release/regiongate /opt/regiongate/bin/regiongate
COPY migrations /opt/regiongate/migrations
USER regiongate
EXPOSE 6432 9930
ENTRYPOINT ["/opt/regiongate/bin/regiongate"]
CMD ["--config", "/etc/regiongate/regiongate.yaml"]
