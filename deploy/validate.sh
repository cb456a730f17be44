#!/usr/bin/env bash
# Validates everything in deploy/ (the lead's .ci/run calls it):
#  * Kubernetes: renders base/ and every overlay (deploy/kubernetes/render.py; and,
#    when kubectl is present, `kubectl kustomize`, which must render the same
#    resources), then validates every resource with kubernetes-validate (PyPI; it
#    ships the Kubernetes JSON schemas, so this runs offline) in strict mode, against
#    the newest and an older Kubernetes release; and runs the pods' certificate copy
#    (kubernetes/base/certs-sync.sh) on a Secret volume laid out as the kubelet does;
#  * HAProxy: `haproxy -c` on the three configurations;
#  * compose: `docker-compose config` on deploy/compose (when a compose tool is there);
#  * Prometheus: `promtool check config`, `promtool check rules` and the rules' unit
#    tests (`promtool test rules`);
#  * systemd: `systemd-analyze verify` on both units;
#  * Grafana: the dashboard JSON is the generator's current output;
#  * every pgquorum_* metric named in the rules, the dashboard and docs/metrics.md is
#    one the code exports.
# Missing tools are installed when running as root (apt-get, pip); otherwise it
# stops and says what to install. Any failure fails the script.
set -euo pipefail
cd "$(dirname "$0")"
DEPLOY=$PWD
ROOT=$(cd .. && pwd)

die() { printf 'deploy/validate.sh: FAILED: %s\n' "$*" >&2; exit 1; }
step() { printf '== %s\n' "$*"; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_install() { # PACKAGE... (as root only)
  is_root && command -v apt-get >/dev/null || die "missing $*: install Debian's $* (apt-get install $*)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; } ||
    die "apt-get install $* failed"
}

command -v python3 >/dev/null || apt_install python3 python3-yaml
if ! python3 -c 'import yaml' 2>/dev/null; then
  python3 -m pip install -q pyyaml || apt_install python3-yaml
fi
if ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install -q 'kubernetes-validate>=1.30' ||
    die "pip install kubernetes-validate failed"
  # Under pyenv a new console script is reachable only after a rehash of the shims.
  if command -v pyenv >/dev/null; then pyenv rehash || true; fi
fi
command -v kubernetes-validate >/dev/null || die "kubernetes-validate is not on PATH after pip install"
command -v haproxy >/dev/null || apt_install haproxy
command -v promtool >/dev/null || apt_install prometheus
command -v promtool >/dev/null || die "no promtool after installing Debian's prometheus"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

step "Kubernetes manifests"
# The newest schemas kubernetes-validate ships, and an older release still in use.
latest=$(python3 -c 'import kubernetes_validate.utils as u; print(u.latest_version())') ||
  die "kubernetes-validate has no schemas"
K8S_VERSIONS=("$latest" 1.29.0)
for dir in base overlays/dev overlays/prod; do
  out="$TMP/$(echo "$dir" | tr / -).yaml"
  python3 kubernetes/render.py "kubernetes/$dir" > "$out" || die "rendering kubernetes/$dir"
  if command -v kubectl >/dev/null; then
    kubectl kustomize "kubernetes/$dir" > "$TMP/kubectl.yaml" || die "kubectl kustomize kubernetes/$dir"
    python3 kubernetes/render.py "kubernetes/$dir" --same-as "$TMP/kubectl.yaml" ||
      die "render.py and kubectl kustomize disagree on kubernetes/$dir"
  fi
  n=$(grep -c '^kind:' "$out")
  [ "$n" -ge 10 ] || die "kubernetes/$dir renders only $n resources"
  for v in "${K8S_VERSIONS[@]}"; do
    kubernetes-validate --strict --quiet -k "$v" "$out" || die "kubernetes/$dir does not validate against Kubernetes $v"
  done
  echo "kubernetes/$dir: $n resources valid (strict) against Kubernetes ${K8S_VERSIONS[*]}"
done

step "Kubernetes certificate copy (base/certs-sync.sh)"
# A Secret volume as the kubelet lays it out with fsGroup (files 0440 behind ..data
# symlinks, every pod's pair): the copy must hold only this pod's files, key 0600.
sh -n kubernetes/base/certs-sync.sh && sh -n kubernetes/certs.sh || die "shell syntax"
sec="$TMP/secret" cp="$TMP/copy"
mkdir -p "$sec/..v1" "$cp"
for f in ca.crt member.1.crt member.1.key member.2.crt member.2.key; do
  echo "$f" > "$sec/..v1/$f"; chmod 0440 "$sec/..v1/$f"; ln -s "..data/$f" "$sec/$f"
done
ln -s ..v1 "$sec/..data"
sh kubernetes/base/certs-sync.sh "$sec" "$cp" member.2 > /dev/null || die "certs-sync.sh failed"
[ "$(cd "$cp" && ls | tr '\n' ' ')" = "ca.crt member.2.crt member.2.key " ] ||
  die "certs-sync.sh copied $(ls "$cp"), not ca.crt and member.2's pair"
[ "$(stat -c %a "$cp/member.2.key")" = 600 ] || die "certs-sync.sh left the key mode $(stat -c %a "$cp/member.2.key")"
[ "$(cat "$cp/member.2.key")" = member.2.key ] || die "certs-sync.sh copied the wrong key"
# A renewal and a new CRL, as the kubelet swaps ..data.
mkdir "$sec/..v2"
for f in ca.crt ca.crl member.1.crt member.1.key member.2.crt member.2.key; do
  echo "$f v2" > "$sec/..v2/$f"; chmod 0440 "$sec/..v2/$f"
done
ln -s ..data/ca.crl "$sec/ca.crl"
ln -sfn ..v2 "$sec/..tmp" && mv -T "$sec/..tmp" "$sec/..data"
sh kubernetes/base/certs-sync.sh "$sec" "$cp" member.2 > /dev/null || die "certs-sync.sh failed on a renewal"
[ "$(cat "$cp/member.2.key" "$cp/ca.crl")" = "$(printf 'member.2.key v2\nca.crl v2')" ] ||
  die "certs-sync.sh did not copy the renewal"
[ "$(stat -c %a "$cp/member.2.key")" = 600 ] || die "certs-sync.sh left the renewed key mode $(stat -c %a "$cp/member.2.key")"
echo "kubernetes/base/certs-sync.sh: copies only the pod's own files, key 0600, renewals included"

step "HAProxy"
for cfg in haproxy/haproxy.cfg kubernetes/base/haproxy.cfg compose/haproxy.cfg; do
  haproxy -c -q -f "$cfg" || die "haproxy -c $cfg"
  echo "$cfg: valid"
done

step "Compose file"
# Interpolated with stand-in secrets: the real ones come from the operator's .env.
if docker compose version >/dev/null 2>&1; then compose=(docker compose)
elif command -v docker-compose >/dev/null; then compose=(docker-compose)
else compose=(); fi
if [ ${#compose[@]} -gt 0 ]; then
  (cd compose && PGQUORUM_REPLICATION_PASSWORD=x PGQUORUM_APP_PASSWORD=x "${compose[@]}" -f docker-compose.yml config -q) ||
    die "deploy/compose/docker-compose.yml is not a valid compose file"
  echo "compose/docker-compose.yml: valid"
else
  echo "no compose tool: compose/docker-compose.yml not checked (install docker-compose to check it)"
fi
bash -n docker/build.sh compose/create-role.sh || die "shell syntax"

step "Prometheus"
promtool check config prometheus/prometheus.yml || die "promtool check config"
promtool check rules prometheus/pgquorum-rules.yml || die "promtool check rules"
(cd prometheus && promtool test rules pgquorum-rules.test.yml) || die "promtool test rules"
python3 -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' prometheus/prometheus-kubernetes.yml ||
  die "prometheus/prometheus-kubernetes.yml is not YAML"

step "systemd units"
if command -v systemd-analyze >/dev/null; then
  # The binary path need not exist on this machine: verify with a stand-in.
  for unit in pgquorum-keeper.service pgquorum-monitor@.service; do
    sed 's#/usr/local/bin/pgquorum#/bin/true#' "systemd/$unit" > "$TMP/$unit"
  done
  (cd "$TMP" && systemd-analyze verify pgquorum-keeper.service pgquorum-monitor@1.service) 2> "$TMP/verify.err" || {
    cat "$TMP/verify.err" >&2; die "systemd-analyze verify"; }
  # verify exits 0 on some warnings: any line about our units is an error here.
  if grep -i 'pgquorum' "$TMP/verify.err" >&2; then die "systemd-analyze verify reported problems"; fi
  echo "systemd units: valid"
else
  echo "systemd-analyze missing: units not checked (install systemd to check them)"
fi

step "Grafana dashboard"
cp grafana/pgquorum-dashboard.json "$TMP/dashboard.json"
python3 grafana/make_dashboard.py
cmp -s grafana/pgquorum-dashboard.json "$TMP/dashboard.json" ||
  die "grafana/pgquorum-dashboard.json is not make_dashboard.py's output: run python3 deploy/grafana/make_dashboard.py and commit"
echo "grafana/pgquorum-dashboard.json: current"

step "Metric names"
exported=$(grep -ohE 'pgquorum_(keeper|monitor)_[a-z_]+' \
  "$ROOT/crates/keeper/src/http.rs" "$ROOT/crates/monitor/src/metrics.rs" | sort -u)
used=$(grep -ohE 'pgquorum_(keeper|monitor)_[a-z_]+' \
  prometheus/pgquorum-rules.yml grafana/make_dashboard.py "$ROOT/docs/metrics.md" | sort -u)
unknown=$(comm -13 <(echo "$exported") <(echo "$used"))
[ -z "$unknown" ] || die "metrics named but not exported by the code: $unknown"
undocumented=$(comm -23 <(echo "$exported") <(grep -ohE 'pgquorum_(keeper|monitor)_[a-z_]+' "$ROOT/docs/metrics.md" | sort -u))
[ -z "$undocumented" ] || die "metrics exported but missing from docs/metrics.md: $undocumented"
echo "$(echo "$used" | wc -l) metric names used, all exported; all $(echo "$exported" | wc -l) exported ones documented"

echo "deploy/validate.sh: all checks passed"
