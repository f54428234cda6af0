#!/usr/bin/env bash
# Build the Debian package of nfsreset from this checkout:
#
#   bash packaging/build-deb.sh        ->  dist/nfsreset_<version>_all.deb
#
# Standard tooling: dpkg-buildpackage + debhelper 13 + dh-python (pybuild with
# the pyproject plugin). The Debian files live in packaging/debian and are
# copied, with the tracked files of the checkout (git ls-files: no .venv, no
# caches), into build/deb/ where dpkg-buildpackage runs; the checkout itself
# is not written to except dist/ and build/. Missing build dependencies are
# installed with apt-get (Debian 12 packages only; NFSRESET_SKIP_APT=1 skips
# that). Then lintian: none of its tags fires today (also with --pedantic);
# a warning that must stay goes into packaging/debian/nfsreset.lintian-overrides
# with its reason.
# Needs: root for apt-get only; the build runs under fakeroot.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "build-deb.sh: $*" >&2; exit 1; }
say() { echo "build-deb.sh: $*"; }

builddeps=(dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
           python3-setuptools python3-typer python3-click help2man fakeroot lintian git)
missing=()
for p in "${builddeps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    [ -z "${NFSRESET_SKIP_APT:-}" ] || die "missing build dependencies: ${missing[*]}"
    [ "$(id -u)" = 0 ] || die "missing build dependencies (${missing[*]}); run as root or: apt-get install ${missing[*]}"
    say "installing build dependencies: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install failed for: ${missing[*]}"
fi

# One version, three places: pyproject.toml is the source of truth.
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/pyproject.toml")
[ -n "$version" ] || die "no version in pyproject.toml"
deb_version=$(cd "$here/packaging" && dpkg-parsechangelog -l debian/changelog -S Version)
[ "$deb_version" = "$version" ] || die "packaging/debian/changelog says $deb_version, pyproject.toml $version: add a changelog entry (dch -v $version)"
grep -qx "__version__ = \"$version\"" "$here/nfsreset/__init__.py" \
    || die "nfsreset/__init__.py's __version__ is not $version"

src="$here/build/deb/nfsreset-$version"
rm -rf "$here/build/deb"
mkdir -p "$src" "$here/dist"
# Tracked files as they are in the work tree (uncommitted edits included:
# this is a build of the checkout, not of a tag). Symlinks stay symlinks
# (nfsreset/bpf -> ../bpf).
(cd "$here" && git ls-files -z --cached --others --exclude-standard -- . ':!:build' ':!:dist' \
    | while IFS= read -r -d '' f; do if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi; done \
    | tar --null -T - -cf -) | tar -C "$src" -xf -
rm -rf "$src/debian"
cp -a "$here/packaging/debian" "$src/debian"

say "dpkg-buildpackage in $src"
t0=$(date +%s%N)
# Debian's python3 and tools only: a pyenv or venv python on PATH (or
# PYTHONPATH) would build for the wrong interpreter.
(cd "$src" && env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    dpkg-buildpackage -b -us -uc -rfakeroot) >"$here/build/deb/build.log" 2>&1 \
    || { tail -n 40 "$here/build/deb/build.log" >&2; die "dpkg-buildpackage failed; full log: build/deb/build.log"; }
t1=$(date +%s%N)
deb="$here/build/deb/nfsreset_${version}_all.deb"
[ -f "$deb" ] || die "dpkg-buildpackage made no $deb"
cp "$deb" "$here/dist/"
say "built dist/$(basename "$deb") in $(( (t1 - t0) / 1000000 )) ms"

# lintian: errors fail the build; warnings must each be overridden with a
# reason in packaging/debian/nfsreset.lintian-overrides.
say "lintian dist/$(basename "$deb")"
lint=$(env PATH=/usr/sbin:/usr/bin:/sbin:/bin lintian --tag-display-limit 0 --display-info "$here/dist/$(basename "$deb")" 2>&1) || true
[ -z "$lint" ] || printf '%s\n' "$lint"
if printf '%s\n' "$lint" | grep -q '^[EW]: '; then
    die "lintian reports errors or warnings (above): fix them or override them with a reason"
fi
say "ok: dist/$(basename "$deb")"
