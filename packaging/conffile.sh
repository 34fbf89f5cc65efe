#!/bin/sh
# Install or remove one configuration file without ever losing a change an
# administrator made to it (what dpkg does for conffiles, for `make install`).
#
#   conffile.sh install SHIPPED PRISTINE TARGET
#   conffile.sh remove  PRISTINE TARGET
#
# PRISTINE is the copy of the file as last installed (kept under
# <prefix>/share/privbroker/defaults/); it tells "changed by the
# administrator" from "an older version we shipped".
#   install: TARGET missing, or still equal to PRISTINE (unchanged): replaced
#            by SHIPPED.  TARGET changed: kept; SHIPPED is put beside it as
#            TARGET.new when it differs, and a line says so.
#            PRISTINE becomes SHIPPED either way.
#   remove:  TARGET removed only if still equal to PRISTINE; PRISTINE removed.
set -eu

same() { [ -f "$1" ] && [ -f "$2" ] && cmp -s "$1" "$2"; }

case "${1:-}" in
install)
    shipped=$2 pristine=$3 target=$4
    mkdir -p "$(dirname "$target")" "$(dirname "$pristine")"
    if [ ! -e "$target" ] || same "$target" "$pristine" || same "$target" "$shipped"; then
        install -m 0644 "$shipped" "$target"
        rm -f "$target.new"
    else
        install -m 0644 "$shipped" "$target.new"
        echo "conffile: kept your $target; the shipped version is $target.new" >&2
    fi
    install -m 0644 "$shipped" "$pristine"
    ;;
remove)
    pristine=$2 target=$3
    if same "$target" "$pristine"; then
        rm -f "$target"
    fi
    if same "$target.new" "$pristine"; then
        rm -f "$target.new"
    fi
    rm -f "$pristine"
    ;;
*)
    echo "usage: $0 install SHIPPED PRISTINE TARGET | remove PRISTINE TARGET" >&2
    exit 2
    ;;
esac
