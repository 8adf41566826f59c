# matchfleet developer entry points. `make run` and `make test` are the two
# commands the README promises; everything else is a step of them.
SHELL := /bin/bash
CARGO ?= cargo
CLUSTER := e2e/cluster

.PHONY: run test lint fmt unit e2e cluster-up cluster-down cluster-status cluster-purge generate

## The main job: brings up the local cluster (building or reusing cached
## components), installs the operator from manifests/, runs the example
## RenderJob over example events, and leaves it all running.
run: cluster-up
	$(CLUSTER)/demo
	@echo
	@echo "export KUBECONFIG=$$PWD/.cluster/admin.kubeconfig PATH=$$PWD/.cluster/bin:\$$PATH"
	@echo "then: kubectl get rj,mp; kubectl describe rj demo; kubectl describe mp matchmaker; make cluster-down when done"

## Every check CI runs: formatting, lints, unit tests, then the end-to-end
## tests on a fresh local cluster, and last the test that stops it.
test: lint unit cluster-purge cluster-up e2e

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --features matchfleet-e2e/cluster-down -- -D warnings

fmt:
	$(CARGO) fmt --all

## Tests that need no cluster: every crate's tests except the e2e suites.
unit:
	$(CARGO) test --workspace --exclude matchfleet-e2e
	$(CARGO) test -p matchfleet-e2e --lib --bins

## The end-to-end suites against the running local cluster, then the one that
## stops it (it builds only with the cluster-down feature, so it runs last).
e2e:
	$(CARGO) test -p matchfleet-e2e --tests
	$(CARGO) test -p matchfleet-e2e --features cluster-down --test cluster_down

## Regenerates crds/ from the Rust types (a test fails when they drift).
generate:
	$(CARGO) run -q -p matchfleet-api --bin crdgen

cluster-up:
	$(CLUSTER)/up

cluster-down:
	$(CLUSTER)/down

cluster-purge:
	$(CLUSTER)/down --purge

cluster-status:
	$(CLUSTER)/status
