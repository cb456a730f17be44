#!/bin/sh
# Copies this pod's own certificate files from the Secret's mount to the directory
# pgquorum reads, as files owned by the pod's user with a 0600 key.
#
# Why a copy: the pods set fsGroup (their data volumes need it), and the kubelet then
# makes every file of a Secret volume group-readable (mode 0440, group = fsGroup)
# whatever its defaultMode (kubernetes/kubernetes#57923), while pgquorum refuses a key
# that anyone but its owner can read. Why only some files: one Secret serves every pod
# of a StatefulSet, and the process needs only ca.crt, ca.crl and its own pair.
#
# usage: certs-sync.sh SRC DST STEM [--watch]
#   STEM is member.N or keeper.NAME. Without --watch: one copy (init container; fails
#   when the pod's own files are missing). With --watch: copies again whenever the
#   Secret changes (renewal, a new ca.crl), which pgquorum picks up within 5 s.
set -eu
src=$1 dst=$2 stem=$3 watch=${4:-}

copy() { # NAME MODE: replace DST/NAME by SRC/NAME when they differ, atomically
  if [ -f "$src/$1" ]; then
    if ! cmp -s "$src/$1" "$dst/$1"; then
      cp "$src/$1" "$dst/.$1.tmp"
      chmod "$2" "$dst/.$1.tmp"
      mv -f "$dst/.$1.tmp" "$dst/$1"
      echo "certs-sync: $dst/$1 updated"
    fi
  elif [ -e "$dst/$1" ]; then
    rm -f "$dst/$1"
    echo "certs-sync: $dst/$1 removed"
  fi
}

sync_once() {
  # Each file is renamed into place whole; the pair lands within microseconds, and
  # pgquorum reloads whenever either file changed.
  copy "$stem.key" 600
  copy "$stem.crt" 644
  copy ca.crt 644
  copy ca.crl 644
}

for f in ca.crt "$stem.crt" "$stem.key"; do
  [ -f "$src/$f" ] || { echo "certs-sync: $src/$f missing: create the Secret first (docs/deployment.md)" >&2; exit 1; }
done
sync_once
if [ "$watch" = --watch ]; then
  # PID 1 of its container: SIGTERM would be ignored without a handler.
  trap 'exit 0' TERM INT
  while sleep 5; do
    sync_once || echo "certs-sync: copy failed, retrying in 5 s" >&2
  done
fi
