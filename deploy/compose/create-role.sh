#!/usr/bin/env bash
# Creates (or updates the password of) an application login role on the compose
# cluster's primary, with a database of the same name that it owns, for HAProxy's
# ports and PgBouncer:
#   PGQUORUM_APP_PASSWORD=... ./create-role.sh [ROLE]      (ROLE defaults to app)
# The password comes from the environment (or .env beside this file) and reaches psql
# through its environment, never through a command line. The role replicates to the
# standbys like any other change.
set -euo pipefail
cd "$(dirname "$0")"
die() { printf 'create-role.sh: %s\n' "$*" >&2; exit 1; }
if [ -f .env ]; then set -a; . ./.env; set +a; fi
role=${1:-${PGQUORUM_APP_USER:-app}}
[[ $role =~ ^[a-z_][a-z0-9_]{0,62}$ ]] || die "role name $role: use lower-case letters, digits and _"
[ -n "${PGQUORUM_APP_PASSWORD:-}" ] || die "set PGQUORUM_APP_PASSWORD (in the environment or .env)"
export PGQUORUM_APP_PASSWORD
project=${COMPOSE_PROJECT_NAME:-pgquorum}
for svc in node1 node2 node3; do
  c=$(docker ps -q --filter "label=com.docker.compose.project=$project" \
        --filter "label=com.docker.compose.service=$svc") || continue
  [ -n "$c" ] || continue
  r=$(docker exec "$c" psql -h /var/run/postgresql -U postgres -d postgres -tAc 'select pg_is_in_recovery()' 2>/dev/null) || continue
  [ "$r" = f ] || continue
  # \getenv (psql 15) reads the password inside the container; :'pw' quotes it.
  docker exec -i -e PGQUORUM_APP_PASSWORD "$c" psql -h /var/run/postgresql -U postgres -d postgres \
      -v ON_ERROR_STOP=1 -q -v role="$role" <<'SQL'
\getenv pw PGQUORUM_APP_PASSWORD
select format('create role %I login', :'role') where not exists (select from pg_roles where rolname = :'role') \gexec
select format('alter role %I login password %L', :'role', :'pw') \gexec
select format('create database %I owner %I', :'role', :'role') where not exists (select from pg_database where datname = :'role') \gexec
SQL
  echo "role and database $role ready on $svc (the primary)"
  exit 0
done
die "no primary found among the node containers of compose project $project (is the cluster up?)"
