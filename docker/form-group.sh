#!/bin/sh
# Forms the node group once: create on tokyo, join sydney and dallas.
set -eu
until pgmesh status --api pgmesh-tokyo:7400 >/dev/null 2>&1; do sleep 1; done
if pgmesh status --api pgmesh-tokyo:7400 | grep -q 'group demo'; then
  echo "group demo exists"; exit 0
fi
token=$(pgmesh group create demo --api pgmesh-tokyo:7400 | tail -n 1)
for region in sydney dallas; do
  until pgmesh status --api "pgmesh-$region:7400" >/dev/null 2>&1; do sleep 1; done
  pgmesh group join --api "pgmesh-$region:7400" --via pgmesh-tokyo:7400 --token "$token"
done
pgmesh status --api pgmesh-tokyo:7400
