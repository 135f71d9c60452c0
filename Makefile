# Deployment shortcuts. `make help` lists them. Nothing here is needed for the tests (pytest runs
# the same checks); these are the commands a person types.
PYTHON ?= python3
COMPOSE ?= docker compose
N ?= 3

.PHONY: help demo image up down logs scale demo-break stack stack-check deploy-check lint-docker

help:  ## this list
	@awk -F':.*## ' '/^[a-z-]+:.*## / {printf "  %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

demo:  ## three demo backends behind balancer, in one process, nothing else needed
	balancer demo

image:  ## build the container image (needs a Docker engine)
	docker build -t balancer:local .

up:  ## the demo stack: balancer, 3 web replicas, Prometheus, Grafana (then: curl localhost:8080)
	$(COMPOSE) up --build -d
	@echo "proxy http://localhost:8080  grafana http://localhost:3000  prometheus http://localhost:9090"

down:  ## stop the demo stack
	$(COMPOSE) down

logs:  ## follow balancer's log in the demo stack
	$(COMPOSE) logs -f balancer

scale:  ## run N web replicas (make scale N=5); balancer's pool follows by DNS discovery
	$(COMPOSE) up -d --scale web=$(N)

demo-break:  ## apply a concentrated config to the running stack: refused, the stack keeps serving
	bash deploy/demo-break.sh

stack:  ## the same topology as local processes (no Docker), checked, kept up until Ctrl-C
	$(PYTHON) deploy/local-stack.py --hold

stack-check:  ## bring the local topology up, check its wiring, tear it down
	$(PYTHON) deploy/local-stack.py

deploy-check:  ## hadolint, compose schema, dashboard queries, Kubernetes schemas
	$(PYTHON) -m pytest -q tests/test_deploy.py

lint-docker:  ## hadolint the Dockerfile
	hadolint Dockerfile
