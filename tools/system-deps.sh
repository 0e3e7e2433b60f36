#!/bin/sh
# Installs the Debian packages listed in tools/system-packages.txt that are not
# installed yet. Needs root (CI and the dev machines are root); elsewhere it
# prints what is missing and leaves it to the user, and the tests that need a
# missing part skip (or fail under CI=true).
set -eu
here=$(dirname "$0")
missing=""
for pkg in $(sed -e 's/#.*//' "$here/system-packages.txt"); do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: not root; install these Debian packages for the full suite:$missing" >&2
    exit 0
fi
echo "system-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
