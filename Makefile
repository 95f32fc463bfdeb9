GO ?= go

.PHONY: build test test-core unit schema demo vet lint tracked-check fmt-check bench soak clean

build:
	$(GO) build -o bin/pgmesh ./cmd/pgmesh

# PG=16, 17 or 18 runs the system tests (and make bench) against that
# PostgreSQL, fetched once by scripts/pg-bin.sh; empty: the newest server
# under /usr/lib/postgresql (Debian's 15). A fetch that fails stops the run.
PG ?=
WITH_PG = $(if $(PG),bin=$$(scripts/pg-bin.sh $(PG)) && export PGMESH_PG_BIN=$$bin && echo "PostgreSQL $(PG): $$bin" &&,)
# The servers fetched for 16+ ship no pg_dump, so joining a node with an
# empty database (join copies the schema with pg_dump) is tested on 15 only.
NEEDS_PG_DUMP = TestJoinAfterSequenceConversion|TestJoinUnderWriteLoad|TestJoinInterruptedAndRetried|TestJoinSurvivesLeaderKill|TestJoinKeepsSourceUpdatesMadeDuringCopy|TestPartDrainForceAndRejoin
# The control plane over real intercontinental latencies takes minutes and
# does not depend on the PostgreSQL version: tested on 15 only.
CONTROL_PLANE = TestGuideLatenciesOnEveryLink
SKIP_15 =
SKIP_16 = $(NEEDS_PG_DUMP)|$(CONTROL_PLANE)
SKIP_17 = $(SKIP_16)
SKIP_18 = $(SKIP_16)
SKIP = $(if $(SKIP_$(or $(PG),15)),-skip '$(SKIP_$(or $(PG),15))',)


# Unit tests and the system tests against real throwaway Postgres clusters.
# Fails loudly when no PostgreSQL 15+ server is installed. The system tests
# run three at a time (t.Parallel): they mostly wait on their clusters.
test: fmt-check vet
	$(WITH_PG) $(GO) test -tags integration -count=1 -timeout 40m -parallel 3 $(SKIP) ./...

# The core of the system tests (write everywhere, every conflict type,
# randomized convergence, kill -9 during apply, clocks, version behaviour),
# for the other versions in CI: make test-core PG=16
CORE_TESTS = TestThreeNodesWriteEverywhere|TestResidencySet|TestConflictTypes|TestInsertWaitingForLocalDelete|TestRandomizedConvergence|TestKillDuringBacklogAppliesExactlyOnce|TestKillDuringGroupedBacklogAppliesExactlyOnce|TestReceiverCrashLosesNothingConfirmed|TestClockSkewConverges|TestFollowingWriteWinsInsideOneInterval|TestGroupedCommitsForm|TestVersionSpecificStreaming|TestSQLRuleMatchesGo|TestFastPathGuardMatchesSequential
test-core:
	$(WITH_PG) $(GO) test -tags integration -count=1 -timeout 15m -parallel 3 -run '$(CORE_TESTS)' ./systemtest/ ./sql/ ./replicator/

unit:
	$(GO) test -count=1 ./...

# sql/schema.sql, the whole pgmesh schema in one file, from the migrations
# (PostgreSQL 15's pg_dump); make test fails while it is stale.
schema:
	PGMESH_WRITE_SCHEMA=1 $(GO) test -tags integration -count=1 -run TestSchemaFileMatchesMigrations ./sql/

vet:
	$(GO) vet -tags integration ./...

# go vet, staticcheck and deadcode must report nothing; CI runs this. The
# tools are installed (pinned) from the Go module proxy on first use.
GOBIN ?= $(shell $(GO) env GOPATH)/bin
STATICCHECK_VERSION = v0.8.2
DEADCODE_VERSION = v0.52.0
lint: vet tracked-check
	@test -x $(GOBIN)/staticcheck || $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	@test -x $(GOBIN)/deadcode || $(GO) install golang.org/x/tools/cmd/deadcode@$(DEADCODE_VERSION)
	$(GOBIN)/staticcheck -tags integration ./...
	@out=$$($(GOBIN)/deadcode -test -tags integration ./...); \
	if [ -n "$$out" ]; then echo "deadcode reports unreachable functions:"; echo "$$out"; exit 1; fi
	@out=$$($(GO) list -deps ./cmd/pgmesh | grep /internal/testing/); \
	if [ -n "$$out" ]; then echo "the pgmesh binary imports test harnesses:"; echo "$$out"; exit 1; fi

# Build outputs never go into git: fail on a tracked executable or any
# tracked file over 1 MB.
tracked-check:
	@bad=$$(git ls-files -z | xargs -0 -r file -N | grep -E ': *ELF ' | cut -d: -f1); \
	big=$$(git ls-files -z | xargs -0 -r stat -c '%s %n' | awk '$$1 > 1048576 {print $$2}'); \
	if [ -n "$$bad$$big" ]; then echo "tracked build outputs or files over 1 MB (remove them, add them to .gitignore): $$bad $$big"; exit 1; fi

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed on: $$out"; exit 1; fi

# A local three-node group on throwaway clusters: writes, a conflict, the log.
demo:
	$(GO) run ./cmd/pgmesh-demo

clean:
	rm -rf bin

# pgmesh against native logical replication and pglogical, same workloads,
# one run (make bench PG=18 on PostgreSQL 18):
# make bench BENCH_ARGS="-single 200000 -big 2000000"
BENCH_ARGS ?=
bench:
	$(WITH_PG) $(GO) run ./cmd/pgmesh-bench $(BENCH_ARGS)

# The randomized convergence test and the fault scenarios, long: each keeps
# its load or fault for SOAK. make soak SOAK=10m SEED=42
SOAK ?= 5m
SEED ?=
SOAK_TESTS = TestRandomizedConvergence|TestRegionCutOffAndHealed|TestFlappingLink|TestOneWayStall|TestThinLink|TestFourRegionsWANLatency|TestGuideLatenciesOnEveryLink
soak:
	$(WITH_PG) PGMESH_SOAK=$(SOAK) PGMESH_SEED=$(SEED) $(GO) test -tags integration -count=1 -timeout 0 -run '$(SOAK_TESTS)' -v ./systemtest/
