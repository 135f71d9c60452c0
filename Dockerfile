# syntax=docker/dockerfile:1
#
# balancer as a container image.
#
#   docker build -t balancer .
#   docker run -p 8080:8080 -v "$PWD/my-config:/etc/balancer:ro" balancer
#
# The config is read from /etc/balancer/balancer.yaml. Mount the *directory*, not the file:
# editors and Kubernetes ConfigMaps replace a file by renaming a new one over it, which a
# single-file bind mount never sees. SIGHUP (`docker kill -s HUP`) or the admin POST /reload
# re-reads it; a config the guard refuses leaves the running one untouched.
#
# The HEALTHCHECK asks the admin address at 127.0.0.1:9100 from inside the container: keep the
# config's `admin` on port 9100 and listening on 127.0.0.1 or 0.0.0.0 (0.0.0.0 when Prometheus
# scrapes it from another container), or override the check with BALANCER_HEALTH_URL.

# ---------------------------------------------------------------- build: wheels, compilers allowed
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY balancer ./balancer
# Every wheel the app needs, the project's own included; uvloop and httptools ship binary
# wheels, anything that would need compiling is compiled here and never reaches the final image.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---------------------------------------------------------------- final: slim, no compilers, non-root
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BALANCER_HEALTH_URL=http://127.0.0.1:9100/healthz
# The wheels are bind-mounted from the build stage for the install only: no layer keeps them.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/balancer-*.whl \
 && groupadd --system --gid 10001 balancer \
 && useradd --system --uid 10001 --gid balancer --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin balancer \
 && mkdir -p /etc/balancer
# Numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080 9100
# balancer drains on SIGTERM (in-flight requests finish, up to drain_timeout); give the runtime's
# stop timeout (docker stop -t, terminationGracePeriodSeconds) a little more than that.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request as u; sys.exit(u.urlopen(os.environ['BALANCER_HEALTH_URL'], timeout=2).status != 200)"]
# Exec form: python is PID 1 and receives SIGTERM/SIGHUP itself (balancer installs its own
# handlers, so PID 1's "no default action" rule does not swallow them); it starts no children,
# so there are no zombies for an init to reap.
ENTRYPOINT ["balancer", "run"]
CMD ["-c", "/etc/balancer/balancer.yaml"]
