#!/bin/sh
# tests/install.sh PREFIX VERSION SOVERSION: what `ninja install` runs.
# Installs the public header, both libraries, kvrt.pc and the tools. DESTDIR
# is honoured (staged installs).
set -eu
prefix=$1 version=$2 so=$3
d=${DESTDIR:-}
install -d "$d$prefix/include" "$d$prefix/lib/pkgconfig" "$d$prefix/bin"
if [ -f connector/kvrt.h ]; then install -m 0644 connector/kvrt.h "$d$prefix/include/kvrt.h"; fi
install -m 0644 build/plain/libkvrt.a "$d$prefix/lib/libkvrt.a"
install -m 0755 "build/plain/libkvrt.so.$version" "$d$prefix/lib/libkvrt.so.$version"
ln -sf "libkvrt.so.$version" "$d$prefix/lib/libkvrt.so.$so"
ln -sf "libkvrt.so.$so" "$d$prefix/lib/libkvrt.so"
install -m 0644 build/kvrt.pc "$d$prefix/lib/pkgconfig/kvrt.pc"
install -m 0755 build/plain/kvrt-perf "$d$prefix/bin/kvrt-perf"
install -m 0755 perf/kvrt-trace "$d$prefix/bin/kvrt-trace"
echo "installed kvrt $version into $d$prefix"
