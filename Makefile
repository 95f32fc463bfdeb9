GO ?= go

.PHONY: build test unit demo vet fmt-check bench soak clean

build:
	$(GO) build -o bin/pgmesh ./cmd/pgmesh

# Unit tests and the system tests against real throwaway Postgres clusters.
# Fails loudly when no PostgreSQL 15+ server is installed.
test: fmt-check vet
	$(GO) test -tags integration -count=1 -timeout 25m ./...

unit:
	$(GO) test -count=1 ./...

vet:
	$(GO) vet -tags integration ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed on: $$out"; exit 1; fi

# A local three-node group on throwaway clusters: writes, a conflict, the log.
demo:
	$(GO) run ./cmd/pgmesh-demo

clean:
	rm -rf bin

# pgmesh against native logical replication, same workloads, one run:
# make bench BENCH_ARGS="-single 200000 -big 2000000"
BENCH_ARGS ?=
bench:
	$(GO) run ./cmd/pgmesh-bench $(BENCH_ARGS)

# The randomized convergence test and the fault scenarios, long: each keeps
# its load or fault for SOAK. make soak SOAK=10m SEED=42
SOAK ?= 5m
SEED ?=
SOAK_TESTS = TestRandomizedConvergence|TestRegionCutOffAndHealed|TestFlappingLink|TestOneWayStall|TestThinLink|TestFourRegionsWANLatency
soak:
	PGMESH_SOAK=$(SOAK) PGMESH_SEED=$(SEED) $(GO) test -tags integration -count=1 -timeout 0 -run '$(SOAK_TESTS)' -v ./systemtest/
