#!/usr/bin/env bash
# Builds the pgquorum image without a container registry:
#  1. the base image pgquorum-base:bookworm, made from Debian's packages with
#     debootstrap (minbase, slimmed the way debian:bookworm-slim is), when it is missing;
#  2. the release binary (cargo build --release -p pgquorum), unless PGQUORUM_BINARY
#     names one already built;
#  3. the image from deploy/docker/Dockerfile, FROM that base, with the binary as the
#     only file of the build context.
# Where a registry is reachable the same Dockerfile builds FROM debian:bookworm-slim
# (its default BASE): see docs/deployment.md.
#
# Also builds pgquorum-proxy:dev (HAProxy and PgBouncer from Debian, Dockerfile.proxy)
# for the compose cluster.
#
# Environment: PGQUORUM_IMAGE (default pgquorum:dev), PGQUORUM_PROXY_IMAGE, PGQUORUM_BINARY (a built
# binary; default: build it), PGQUORUM_DEBIAN_MIRROR (default: the mirror apt uses
# here, else deb.debian.org). Runs as root (debootstrap needs it). Prints the image
# size at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BASE=pgquorum-base:bookworm
IMAGE=${PGQUORUM_IMAGE:-pgquorum:dev}
PROXY_IMAGE=${PGQUORUM_PROXY_IMAGE:-pgquorum-proxy:dev}

die() { printf 'deploy/docker/build.sh: %s\n' "$*" >&2; exit 1; }
say() { printf '== %s\n' "$*"; }

command -v docker >/dev/null || die "no docker client: install Docker (Debian: apt-get install docker.io)"
docker info >/dev/null 2>&1 || die "no Docker engine reachable (docker info fails): start it, or set DOCKER_HOST"

# The mirror apt already uses, so the base comes from where this machine's packages come from.
mirror() {
  if [ -n "${PGQUORUM_DEBIAN_MIRROR:-}" ]; then echo "$PGQUORUM_DEBIAN_MIRROR"; return; fi
  local m
  m=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null |
      grep -v security | sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' |
      awk '{print $1; exit}')
  echo "${m:-http://deb.debian.org/debian}"
}

make_base() {
  [ "$(id -u)" = 0 ] || die "making $BASE needs root (debootstrap): run as root, or docker load a base image named $BASE"
  if ! command -v debootstrap >/dev/null; then
    say "installing Debian's debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; } ||
      die "apt-get install debootstrap failed"
  fi
  local dir m
  dir=$(mktemp -d /tmp/pgquorum-base.XXXXXX)
  # The root tree is several thousand root-owned files: removed whatever happens.
  trap 'rm -rf "$dir"' RETURN
  m=$(mirror)
  say "debootstrap bookworm (minbase) from $m"
  debootstrap --variant=minbase bookworm "$dir/root" "$m" > "$dir/debootstrap.log" 2>&1 ||
    { tail -20 "$dir/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
  local r="$dir/root"
  # What debian:bookworm-slim does: no documentation, manual pages or translations,
  # now or in any package installed later; apt keeps no package lists or archives.
  cat > "$r/etc/dpkg/dpkg.cfg.d/pgquorum-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
CFG
  cat > "$r/etc/apt/apt.conf.d/pgquorum-slim" <<'CFG'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
CFG
  find "$r/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
  find "$r/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
  rm -rf "$r/usr/share/man/"* "$r/usr/share/info/"* "$r/var/cache/apt/"*.bin \
         "$r/var/cache/apt/archives/"*.deb "$r/var/lib/apt/lists/"* "$r/var/log/"*.log
  find "$r/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
  # The containers' apt reads the same mirror the base came from.
  echo "deb $m bookworm main" > "$r/etc/apt/sources.list"
  say "importing $BASE"
  tar -C "$r" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE" >/dev/null || die "docker import failed"
}

if docker image inspect "$BASE" >/dev/null 2>&1; then
  say "$BASE is there"
else
  start=$(date +%s)
  make_base
  say "$BASE made in $(( $(date +%s) - start )) s"
fi

bin=${PGQUORUM_BINARY:-}
if [ -z "$bin" ]; then
  say "cargo build --release -p pgquorum"
  (cd "$ROOT" && cargo build --release --locked -p pgquorum) || die "cargo build failed"
  bin="${CARGO_TARGET_DIR:-$ROOT/target}/release/pgquorum"
fi
[ -x "$bin" ] || die "no executable pgquorum binary at $bin"

# The build context is the binary alone: nothing else of the tree is sent to the engine.
ctx=$(mktemp -d /tmp/pgquorum-context.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/image" "$ctx/proxy"
# Debug information stays out of the image (the release profile keeps it for profiling).
if command -v strip >/dev/null; then
  strip -o "$ctx/image/pgquorum" "$bin" || die "strip $bin failed"
else
  cp "$bin" "$ctx/image/pgquorum"
fi
build() { # IMAGE DOCKERFILE CONTEXT
  local log="$ctx/build-$(echo "$1" | tr ':/' '__').log" start size old new
  old=$(docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true)
  say "docker build $1 (FROM $BASE)"
  start=$(date +%s)
  # The legacy builder: BuildKit needs the buildx plugin, which Debian's docker.io lacks.
  DOCKER_BUILDKIT=0 docker build --build-arg "BASE=$BASE" -f "$2" -t "$1" "$3" > "$log" 2>&1 ||
    { tail -30 "$log" >&2; die "docker build $1 failed (log above)"; }
  # The image this one replaces would stay behind untagged: remove it (not when a
  # container still uses it).
  new=$(docker image inspect -f '{{.Id}}' "$1")
  if [ -n "$old" ] && [ "$old" != "$new" ]; then docker rmi "$old" >/dev/null 2>&1 || true; fi
  size=$(docker image inspect -f '{{.Size}}' "$1")
  say "$1 built in $(( $(date +%s) - start )) s: $(( size / 1000000 )) MB"
}
# Both at once: each is mostly apt downloading and unpacking. The proxy image (HAProxy
# and PgBouncer for deploy/compose) has a context of its own, with no binary.
build "$IMAGE" "$ROOT/deploy/docker/Dockerfile" "$ctx/image" & main=$!
build "$PROXY_IMAGE" "$ROOT/deploy/docker/Dockerfile.proxy" "$ctx/proxy" & proxy=$!
wait "$main" || die "building $IMAGE failed"
wait "$proxy" || die "building $PROXY_IMAGE failed"
