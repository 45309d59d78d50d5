#!/bin/sh
# Install Haraka and the plugins the bench's `haraka` peers load into .cache/haraka
# (bench/haraka/package.json; every version pinned by bench/haraka/package-lock.json),
# with `npm ci`: no optional plugins, no install scripts, nothing outside .cache/haraka.
# Haraka 3.3 needs Node.js >= 20 (its package.json `engines`); scripts/install-debs.sh
# installs Debian's nodejs and npm when `node` is missing. Quiet and idempotent: with
# the pinned set installed it prints nothing and changes nothing.
set -e
DIR=.cache/haraka
SRC=bench/haraka
sum=$(cat "$SRC/package.json" "$SRC/package-lock.json" | cksum | cut -d' ' -f1)
stamp="$DIR/.installed-$sum"
[ -f "$stamp" ] && [ -f "$DIR/node_modules/Haraka/bin/haraka" ] && exit 0
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "install-haraka: node and npm are missing: run sh scripts/install-debs.sh (make debs)" >&2
    exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 20 ]; then
    echo "install-haraka: Haraka 3.3 needs Node.js >= 20; this is $(node --version)" \
         "(Debian bookworm ships 18; Debian trixie and NodeSource ship 20 or later)" >&2
    exit 1
fi
mkdir -p "$DIR"
cp "$SRC/package.json" "$SRC/package-lock.json" "$DIR/"
log=$(mktemp)
if ! ( cd "$DIR" && npm ci --omit=optional --ignore-scripts --no-audit --no-fund \
        --loglevel=error ) >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"
    echo "install-haraka: npm ci failed in $DIR" >&2; exit 1
fi
rm -f "$log" "$DIR"/.installed-*
touch "$stamp"
