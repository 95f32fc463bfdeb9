# The pgmesh binary in a small image (used by docker-compose.yml).
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -o /pgmesh ./cmd/pgmesh

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates postgresql-client \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /pgmesh /usr/local/bin/pgmesh
COPY docker/form-group.sh /usr/local/bin/form-group.sh
ENTRYPOINT ["pgmesh"]
