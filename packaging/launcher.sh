#!/bin/sh
# dynamo-run @VERSION@, single-file build (@KEY@). Built by packaging/build.sh.
#
# This file is this short sh script followed by a gzip'd tar of the one-folder PyInstaller
# build. The first run of this build unpacks it once into a cache folder; every run then execs
# the program from there (same process id, arguments and signals pass straight through).
#   cache: $DYN_BINARY_CACHE, else $XDG_CACHE_HOME/dynamo-run, else ~/.cache/dynamo-run;
#          ${TMPDIR:-/tmp}/dynamo-run-UID when there is no HOME or it cannot be written.
#          One folder per build, ~@UNPACKED_MB@ MB; remove old ones freely when no dynamo-run of
#          that build is running.
#   unpack by hand: tail -c +@OFFSET@ dynamo-run | tar -xzf - -C DIR
key='@KEY@'
if [ -n "${DYN_BINARY_CACHE:-}" ]; then
  root=$DYN_BINARY_CACHE
elif [ -n "${XDG_CACHE_HOME:-}" ]; then
  root=$XDG_CACHE_HOME/dynamo-run
elif [ -n "${HOME:-}" ]; then
  root=$HOME/.cache/dynamo-run
else
  root=
fi
if [ -n "$root" ] && [ -x "$root/$key/dynamo-run" ]; then
  exec "$root/$key/dynamo-run" "$@"
fi

if [ -z "$root" ] || ! mkdir -p "$root" 2>/dev/null || [ ! -w "$root" ]; then
  # A shared temporary folder: used only when it is ours and private.
  root="${TMPDIR:-/tmp}/dynamo-run-$(id -u)"
  mkdir -p "$root" 2>/dev/null
  if ! chmod 700 "$root" 2>/dev/null || [ ! -O "$root" ]; then
    echo "dynamo-run: error: no cache folder to unpack into (set DYN_BINARY_CACHE)" >&2
    exit 1
  fi
  if [ -x "$root/$key/dynamo-run" ]; then
    exec "$root/$key/dynamo-run" "$@"
  fi
fi
dir="$root/$key"
if [ -t 2 ]; then
  echo "dynamo-run: first run of this build: unpacking into $dir" >&2
fi
tmp=$(mktemp -d "$root/.unpack-$key.XXXXXX") || exit 1
if ! tail -c +@OFFSET@ "$0" | tar -xzf - -C "$tmp"; then
  rm -rf "$tmp"
  echo "dynamo-run: error: cannot unpack $0 into $root" >&2
  exit 1
fi
# Atomic publish. If another first run won the race, mv puts ours inside its folder: drop it.
mv "$tmp" "$dir" 2>/dev/null || true
rm -rf "$dir/${tmp##*/}" "$tmp"
exec "$dir/dynamo-run" "$@"
exit 127
