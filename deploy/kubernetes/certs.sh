#!/bin/sh
# Makes the certificates of deploy/kubernetes and loads them into the two Secrets the
# pods mount. Run it where the CA's key is kept (never in the cluster), with the
# pgquorum binary and kubectl on PATH:
#
#   deploy/kubernetes/certs.sh NAMESPACE CERTS_DIR
#
# NAMESPACE is the overlay's (pgquorum, or pgquorum-dev for overlays/dev). It creates
# what is missing in CERTS_DIR (the CA; member.1-3 valid for the names the members are
# dialled at: pgquorum-monitor-N.pgquorum-monitor, its .NAMESPACE.svc[.cluster.local]
# forms, and localhost/127.0.0.1 for `kubectl port-forward`; keeper.pgquorum-pg-0..2
# valid for the pods' --pg-host names; client.admin, an operator, for you), then
# creates or updates the Secrets pgquorum-monitor-certs (ca.crt, ca.crl, member.*) and
# pgquorum-pg-certs (ca.crt, ca.crl, keeper.*). ca.key never leaves CERTS_DIR.
# Run it again after a renewal (`pgquorum cert create-... --overwrite`) or a
# revocation (`pgquorum cert revoke ...`): the pods copy the new files within about a
# minute and reload them within 5 s more, without a restart. Members and nodes
# beyond 3: MEMBERS=5 NODES=4 deploy/kubernetes/certs.sh ...
set -eu
[ $# -eq 2 ] || { echo "usage: $0 NAMESPACE CERTS_DIR" >&2; exit 2; }
ns=$1 dir=$2
members=${MEMBERS:-3} nodes=${NODES:-3}
export PGQUORUM_CERTS_DIR="$dir"
unset PGQUORUM_CLIENT

[ -f "$dir/ca.crt" ] || pgquorum cert create-ca
i=0
while [ "$i" -lt "$members" ]; do
  pod=pgquorum-monitor-$i.pgquorum-monitor
  [ -f "$dir/member.$((i + 1)).crt" ] ||
    pgquorum cert create-member --id $((i + 1)) --host "$pod" --host "$pod.$ns.svc" \
      --host "$pod.$ns.svc.cluster.local" --host localhost --host 127.0.0.1
  i=$((i + 1))
done
i=0
while [ "$i" -lt "$nodes" ]; do
  [ -f "$dir/keeper.pgquorum-pg-$i.crt" ] ||
    pgquorum cert create-keeper --name "pgquorum-pg-$i" --host "pgquorum-pg-$i.pgquorum-pg.$ns.svc"
  i=$((i + 1))
done
[ -n "$(find "$dir" -maxdepth 1 -name 'client.*.crt' -print -quit)" ] ||
  pgquorum cert create-client --name admin --role operator

secret() { # NAME PREFIX: ca.crt, ca.crl (if any) and every PREFIX.* pair
  set -- "$1" "$2" --from-file="$dir/ca.crt"
  [ -f "$dir/ca.crl" ] && set -- "$@" --from-file="$dir/ca.crl"
  for f in "$dir/$2".*.crt "$dir/$2".*.key; do
    [ -f "$f" ] && set -- "$@" --from-file="$f"
  done
  name=$1
  shift 2
  kubectl -n "$ns" create secret generic "$name" "$@" --dry-run=client -o yaml |
    kubectl -n "$ns" apply -f -
}
secret pgquorum-monitor-certs member
secret pgquorum-pg-certs keeper
pgquorum cert list
