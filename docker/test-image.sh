#!/usr/bin/env bash
# End-to-end test of the UffdGrpc server image with podman, on a machine that reaches no
# container registry (recipe: /work/shared/container/README.md).
#
#   sudo docker/test-image.sh               # host publish + docker/Dockerfile.prebuilt (fast path)
#   sudo docker/test-image.sh --multistage  # also build docker/Dockerfile (SDK stand-in, ~+45 s cold)
#   sudo docker/test-image.sh --clean       # remove the cache dir and the private podman storage
#
# Steps: apt-get install podman runc debootstrap (if missing) -> Debian 12 minbase rootfs
# (debootstrap once; the tar is cached) -> podman import -> stand-in for
# mcr.microsoft.com/dotnet/aspnet:10.0 (host .NET runtime) -> dotnet publish on the host ->
# podman build -> podman run -p 127.0.0.1:<free port>:8080 -> gRPC health SERVING ->
# CLI replay of p41-seed-child-writes-first.scn against the container, cmp with the golden ->
# container runs as non-root -> podman stop (graceful, exit 0) and rm ->
# docker/compose.yaml with podman-compose (Debian's 1.0.3): up, the server's gRPC health check
# passes (`podman healthcheck run`; podman runs no health timers without systemd), the demo
# container reaches the server by service name and its handler serves the guest's fault ->
# down -> the UffdGrpc.Testing container fixture test against podman's Docker-compatible API
# (`podman system service`), really run (not skipped).
# Exit status 0 only if every step passed.
#
# Environment: UFFDGRPC_CONTAINER_CACHE (default /var/tmp/uffdgrpc-container) holds the rootfs
# tar, the stand-in build contexts, the publish output and podman's private storage
# (docker/storage.conf, rewritten to this dir). Podman settings: docker/containers.conf.
# Stand-in images are reused when present; pass --rebuild-base to rebuild them from the tar.
# PORT=NNNN picks the host port (default: a free one chosen by podman). Only 127.0.0.1 is used.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKER_DIR=$REPO/docker
CACHE=${UFFDGRPC_CONTAINER_CACHE:-/var/tmp/uffdgrpc-container}
SCENARIO=tests/conformance/scenarios/p41-seed-child-writes-first.scn
GOLDEN=${SCENARIO%.scn}.out
OS_IMAGE=localhost/uffdgrpc-standin/debian:bookworm-minbase
ASPNET_IMAGE=localhost/uffdgrpc-standin/dotnet-aspnet:10.0
SDK_IMAGE=localhost/uffdgrpc-standin/dotnet-sdk:10.0
APP_TAG=localhost/uffdgrpc-server:test
MULTISTAGE=0 REBUILD_BASE=0 CLEAN=0

for a in "$@"; do
  case $a in
    --multistage) MULTISTAGE=1 ;;
    --rebuild-base) REBUILD_BASE=1 ;;
    --clean) CLEAN=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument: $a (see --help)" >&2; exit 2 ;;
  esac
done

export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1
export CONTAINERS_CONF=$DOCKER_DIR/containers.conf
export CONTAINERS_STORAGE_CONF=$CACHE/storage.conf

T0=$(date +%s.%N)
TS=$T0
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
step() { TS=$(now); echo "==> [$(secs "$T0" "$TS")s] $*"; }
done_() { echo "    ok ($(secs "$TS" "$(now)")s)${1:+: $1}"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root (apt-get, rootful podman)"
cd "$REPO"

if [ "$CLEAN" = 1 ]; then
  step "clean: remove $CACHE (rootfs tar, contexts, private podman storage)"
  if [ -d "$CACHE/storage" ] && command -v podman >/dev/null; then
    podman rm -a -f >/dev/null 2>&1 || true
    podman system reset -f >/dev/null 2>&1 || true
  fi
  rm -rf "$CACHE"
  done_
  exit 0
fi

mkdir -p "$CACHE"
sed "s#/var/tmp/uffdgrpc-container#$CACHE#g" "$DOCKER_DIR/storage.conf" > "$CACHE/storage.conf"

# 1. Packages ------------------------------------------------------------------------------
step "packages: podman runc debootstrap curl podman-compose"
missing=""
for p in podman runc debootstrap curl podman-compose; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  done_ "installed$missing"
else
  done_ "already installed"
fi
podman info --format '{{.Host.OCIRuntime.Name}} {{.Store.GraphDriverName}}' >/dev/null \
  || fail "podman info failed (CONTAINERS_CONF=$CONTAINERS_CONF)"

image_exists() { podman image exists "$1"; }

# 2. OS base image: debootstrap once, cache the slim tar, podman import ---------------------
TAR=$CACHE/bookworm-minbase.tar
if [ "$REBUILD_BASE" = 1 ]; then
  podman rmi -f "$APP_TAG" "$ASPNET_IMAGE" "$SDK_IMAGE" "$OS_IMAGE" >/dev/null 2>&1 || true
fi
if ! image_exists "$OS_IMAGE"; then
  if [ ! -s "$TAR" ]; then
    step "debootstrap Debian 12 minbase (once; cached as $TAR)"
    MIRROR=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
    rm -rf "$CACHE/rootfs" "$TAR.tmp"
    debootstrap --variant=minbase --include=ca-certificates,libssl3 \
      bookworm "$CACHE/rootfs" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
      || { tail -n 20 "$CACHE/debootstrap.log" >&2; fail "debootstrap (log: $CACHE/debootstrap.log)"; }
    tar -C "$CACHE/rootfs" --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' \
      --exclude='./usr/share/doc/*' --exclude='./usr/share/man/*' --exclude='./usr/share/locale/*' \
      --exclude='./usr/share/info/*' -cf "$TAR.tmp" .
    mv "$TAR.tmp" "$TAR"
    rm -rf "$CACHE/rootfs"
    done_ "$(du -h "$TAR" | cut -f1) tar"
  fi
  step "podman import $OS_IMAGE"
  podman import -q --change 'CMD ["bash"]' "$TAR" "$OS_IMAGE" >/dev/null
  done_
else
  step "OS base image $OS_IMAGE present"; done_ "reused"
fi

# 3. Stand-in for mcr.microsoft.com/dotnet/aspnet:10.0 (host runtime) -----------------------
if ! image_exists "$ASPNET_IMAGE"; then
  step "build stand-in $ASPNET_IMAGE (host .NET runtime: $(dotnet --list-runtimes | awk '/NETCore.App/ { print $2 }' | tail -n 1))"
  ctx=$CACHE/aspnet-ctx
  rm -rf "$ctx"; mkdir -p "$ctx/dotnet"
  for f in dotnet host shared LICENSE.txt ThirdPartyNotices.txt; do
    cp -a "/usr/share/dotnet/$f" "$ctx/dotnet/"
  done
  podman build -q --build-arg OS_IMAGE="$OS_IMAGE" -f "$DOCKER_DIR/standin/aspnet.Containerfile" \
    -t "$ASPNET_IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
  done_
else
  step "stand-in $ASPNET_IMAGE present"; done_ "reused"
fi

# 4. Host publish + CLI build ---------------------------------------------------------------
PUB=$CACHE/publish
step "dotnet publish src/UffdGrpc.Server -c Release -o $PUB"
rm -rf "$PUB"
dotnet publish src/UffdGrpc.Server -c Release -o "$PUB" /p:UseAppHost=false -nologo -v q > "$CACHE/publish.log" 2>&1 \
  || { tail -n 30 "$CACHE/publish.log" >&2; fail "dotnet publish"; }
# The CLI goes in the image too (/app/cli): the compose file's health probe and demo.
dotnet publish src/UffdGrpc.Cli -c Release -o "$PUB/cli" /p:UseAppHost=false -nologo -v q >> "$CACHE/publish.log" 2>&1 \
  || { tail -n 30 "$CACHE/publish.log" >&2; fail "dotnet publish (CLI)"; }
[ -f "$PUB/UffdGrpc.Server.dll" ] && [ -f "$PUB/appsettings.json" ] && [ -f "$PUB/cli/UffdGrpc.Cli.dll" ] || fail "publish output incomplete"
done_
step "dotnet build src/UffdGrpc.Cli -c Release"
dotnet build src/UffdGrpc.Cli -c Release -nologo -v q > "$CACHE/cli-build.log" 2>&1 \
  || { tail -n 30 "$CACHE/cli-build.log" >&2; fail "CLI build"; }
CLI=src/UffdGrpc.Cli/bin/Release/net10.0/UffdGrpc.Cli.dll
[ -f "$CLI" ] || fail "$CLI missing"
done_

# 5. Image build(s) -------------------------------------------------------------------------
step "podman build -f docker/Dockerfile.prebuilt ($APP_TAG)"
podman build -q --build-arg BASE_IMAGE="$ASPNET_IMAGE" -f "$DOCKER_DIR/Dockerfile.prebuilt" \
  -t "$APP_TAG" "$PUB" >/dev/null
done_ "$(podman image inspect --format '{{.Id}}' "$APP_TAG" | cut -c1-12), $(podman image inspect --format '{{.Size}}' "$APP_TAG" | awk '{ printf "%.0f MB", $1/1e6 }')"

IMAGES=("$APP_TAG")
if [ "$MULTISTAGE" = 1 ]; then
  if ! image_exists "$SDK_IMAGE"; then
    step "build stand-in $SDK_IMAGE (host SDK, host CA certificates)"
    ctx=$CACHE/sdk-ctx
    rm -rf "$ctx"; mkdir -p "$ctx/certs"
    cp -a /usr/share/dotnet "$ctx/dotnet"
    cp /usr/local/share/ca-certificates/*.crt "$ctx/certs/" 2>/dev/null || true
    podman build -q --build-arg OS_IMAGE="$OS_IMAGE" -f "$DOCKER_DIR/standin/sdk.Containerfile" \
      -t "$SDK_IMAGE" "$ctx" >/dev/null
    rm -rf "$ctx"
    done_
  else
    step "stand-in $SDK_IMAGE present"; done_ "reused"
  fi
  step "podman build -f docker/Dockerfile (multi-stage, context = repo root) ($APP_TAG-ms)"
  podman build --build-arg SDK_IMAGE="$SDK_IMAGE" --build-arg BASE_IMAGE="$ASPNET_IMAGE" \
    --ignorefile "$DOCKER_DIR/Dockerfile.dockerignore" -f "$DOCKER_DIR/Dockerfile" \
    -t "$APP_TAG-ms" "$REPO" > "$CACHE/multistage-build.log" 2>&1 \
    || { tail -n 40 "$CACHE/multistage-build.log" >&2; fail "multi-stage build (log: $CACHE/multistage-build.log)"; }
  done_
  IMAGES+=("$APP_TAG-ms")
fi

# 6. Run each image and prove it end to end from the host -----------------------------------
CID=""          # the container's name while one exists (removed on any exit)
PROJECT=""      # the compose project while it is up
SERVICE_PID=""  # podman system service while it runs
cleanup() {
  if [ -n "$CID" ]; then podman rm -f -t 5 "$CID" >/dev/null 2>&1 || true; fi
  if [ -n "$PROJECT" ]; then
    podman-compose -f "$DOCKER_DIR/compose.yaml" -p "$PROJECT" down >/dev/null 2>&1 || true
    podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true
  fi
  if [ -n "$SERVICE_PID" ]; then kill "$SERVICE_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

health() {  # grpc.health.v1.Health/Check with an empty request over h2c; SERVING = 00 00 00 00 02 08 01
  printf '\0\0\0\0\0' | curl -sS --max-time 2 --http2-prior-knowledge -H 'content-type: application/grpc' \
    -H 'te: trailers' --data-binary @- "http://127.0.0.1:$1/grpc.health.v1.Health/Check" 2>/dev/null \
    | od -An -tx1 | tr -s ' \n' ' ' | sed 's/^ //; s/ $//'
}

for img in "${IMAGES[@]}"; do
  step "podman run $img -p 127.0.0.1:${PORT:-<free>}:8080"
  CID=uffdgrpc-test-$$
  podman run -d --name "$CID" -p "127.0.0.1:${PORT:-}:8080" "$img" >/dev/null \
    || fail "podman run $img (port ${PORT:-<free>} in use?)"
  HOSTPORT=$(podman port "$CID" 8080/tcp | awk -F: '{ print $NF }' | head -n 1)
  case $(podman port "$CID" 8080/tcp | head -n 1) in 127.0.0.1:*) ;; *) fail "port not bound to 127.0.0.1 only" ;; esac
  [ -n "$HOSTPORT" ] || fail "no host port for 8080"
  done_ "container $CID on 127.0.0.1:$HOSTPORT"

  step "wait for grpc.health.v1.Health/Check = SERVING (max 30 s)"
  ok=0
  for _ in $(seq 1 60); do
    if [ "$(health "$HOSTPORT")" = "00 00 00 00 02 08 01" ]; then ok=1; break; fi
    [ "$(podman inspect --format '{{.State.Running}}' "$CID")" = true ] || break
    sleep 0.5
  done
  [ "$ok" = 1 ] || { podman logs "$CID" >&2 || true; fail "server in the container never became SERVING"; }
  done_

  step "replay $SCENARIO against the container; cmp with $GOLDEN"
  out=$CACHE/replay.out
  timeout 120 dotnet "$CLI" replay "$SCENARIO" --server "http://127.0.0.1:$HOSTPORT" > "$out" \
    || { podman logs "$CID" >&2 || true; fail "replay exited non-zero"; }
  cmp "$out" "$GOLDEN" || { diff "$GOLDEN" "$out" | head -n 20 >&2; fail "replay output differs from the golden"; }
  done_ "$(wc -c < "$out") bytes identical"

  step "container runs as non-root"
  uid=$(podman exec "$CID" id -u)
  [ "$uid" != 0 ] || fail "container runs as root"
  done_ "uid $uid ($(podman exec "$CID" id -un))"

  step "podman stop (SIGTERM, graceful) and rm"
  podman stop -t 10 "$CID" >/dev/null
  code=$(podman inspect --format '{{.State.ExitCode}}' "$CID")
  podman logs "$CID" > "$CACHE/container.log" 2>&1 || true
  podman rm "$CID" >/dev/null
  CID=""
  [ "$code" = 0 ] || { cat "$CACHE/container.log" >&2; fail "server exited with $code after SIGTERM"; }
  done_ "exit code 0"
done

# 7. Compose: the server and the demo, by service name ---------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PROJECT=uffdgrpc-ci-$$
step "podman-compose -f docker/compose.yaml -p $PROJECT up -d --no-build (image $APP_TAG)"
export UFFDGRPC_IMAGE=$APP_TAG UFFDGRPC_PORT=${COMPOSE_PORT:-$(free_port)}
podman-compose -f "$DOCKER_DIR/compose.yaml" -p "$PROJECT" up -d --no-build > "$CACHE/compose-up.log" 2>&1 \
  || { tail -n 30 "$CACHE/compose-up.log" >&2; fail "podman-compose up"; }
done_ "server on 127.0.0.1:$UFFDGRPC_PORT"

step "the demo container serves its guest's fault through the server (max 120 s)"
code=$(timeout 120 podman wait "${PROJECT}_demo_1" 2>/dev/null | tail -n 1) || true
podman logs "${PROJECT}_demo_1" > "$CACHE/compose-demo.log" 2>&1 || true
[ "$code" = 0 ] || { cat "$CACHE/compose-demo.log" >&2; podman logs "${PROJECT}_server_1" >&2 || true; fail "demo exited with '${code:-no status}'"; }
grep -q '^handler | pagefault at 0x7e0000000000 flags=WRITE|WP' "$CACHE/compose-demo.log" \
  && grep -q '^guest   | 4. write A 0x33: ok after' "$CACHE/compose-demo.log" \
  || { cat "$CACHE/compose-demo.log" >&2; fail "the demo's handler did not serve the fault"; }
done_ "$(grep -c '' "$CACHE/compose-demo.log") lines; handler served the WP fault, the write returned"

step "the server's compose health check (gRPC health through the image's CLI) and the published port"
podman healthcheck run "${PROJECT}_server_1" > /dev/null || fail "podman healthcheck run ${PROJECT}_server_1"
[ "$(health "$UFFDGRPC_PORT")" = "00 00 00 00 02 08 01" ] || fail "127.0.0.1:$UFFDGRPC_PORT is not SERVING"
done_ "healthy"

step "podman-compose down"
podman-compose -f "$DOCKER_DIR/compose.yaml" -p "$PROJECT" down > "$CACHE/compose-down.log" 2>&1 \
  || { tail -n 20 "$CACHE/compose-down.log" >&2; fail "podman-compose down"; }
podman network rm -f "${PROJECT}_default" >/dev/null 2>&1 || true  # 1.0.3's down leaves it
[ -z "$(podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT")" ] || fail "compose containers left behind"
PROJECT=""
done_

# 8. The UffdGrpc.Testing container fixture, via podman's Docker-compatible API ---------------
step "UffdGrpc.Testing: the Testcontainers fixture against podman system service (max 300 s)"
SOCK=$CACHE/podman.sock
rm -f "$SOCK"
podman system service --time=0 "unix://$SOCK" > "$CACHE/podman-service.log" 2>&1 &
SERVICE_PID=$!
for _ in $(seq 1 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || fail "podman system service did not create $SOCK"
DOCKER_HOST=unix://$SOCK TESTCONTAINERS_RYUK_DISABLED=true UFFDGRPC_IMAGE=$APP_TAG \
  timeout 300 dotnet test tests/UffdGrpc.Testing.Tests -c Release --filter 'FullyQualifiedName~ContainerFixtureTests' \
  > "$CACHE/testcontainers.log" 2>&1 || { tail -n 40 "$CACHE/testcontainers.log" >&2; fail "container fixture test"; }
grep -Eq 'Passed: +1, Skipped: +0' "$CACHE/testcontainers.log" || { tail -n 20 "$CACHE/testcontainers.log" >&2; fail "the container fixture test did not run"; }
kill "$SERVICE_PID" 2>/dev/null || true
wait "$SERVICE_PID" 2>/dev/null || true
SERVICE_PID=""
done_ "1 passed, 0 skipped"
podman image prune -f >/dev/null 2>&1 || true

echo "PASS: ${IMAGES[*]} served $SCENARIO identically to the golden; compose (server + demo) up, served, down; the container fixture ran (total $(secs "$T0" "$(now)")s)"
